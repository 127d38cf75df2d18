"""The sample journal of a sweep: ``logs/samples.jsonl``, one line per measured sample.

A sweep measures round by round across all of its files (see
:func:`toolkit.profiler.sweep.interleaved_schedule`), so no file is complete before the last
round. Every measured sample is therefore appended here as soon as it lands, with all that
its file needs (the drawn spec, every run of the vision stage, the prefill, each decode pass
and the total, from which the file's medians and noise records are computed, and the
sample's metadata). ``--resume`` reads it back and measures only what is missing: a killed
process loses at most the samples it had in flight.

The first line is a header naming what the samples were measured with; a resumed sweep must
match it. A line that does not parse (a torn last line: the process died mid-write) is
ignored and dropped when the journal is rewritten on resume.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from toolkit.atomic import write_text_atomic
from toolkit.errors import LatkitError
from toolkit.profiler.datasets import SampleSpec
from toolkit.profiler.timing import SampleTiming

log = logging.getLogger(__name__)

JOURNAL_NAME = "samples.jsonl"
FORMAT = "latkit profile sample journal 1"


@dataclass(frozen=True)
class JournaledSample:
    """One journal line: sample ``index`` of the file ``key`` (its path under the results
    directory without ``.json``/``.json.gz``)."""

    key: str
    index: int
    timing: SampleTiming
    metadata: dict[str, Any]


def _runs(value: Any, count: int | None, what: str) -> list[float]:
    if not isinstance(value, list) or (count is not None and len(value) != count):
        raise ValueError(f"{what}: expected {count} runs")
    runs = [float(v) for v in value]
    if not all(math.isfinite(v) and v >= 0 for v in runs):
        raise ValueError(f"{what}: a run is not a finite non-negative time")
    return runs


def sample_line(sample: JournaledSample) -> str:
    """The sample as one JSON line (times at full precision: a resumed sweep writes the same
    files as one that never stopped)."""
    timing, spec = sample.timing, sample.timing.spec
    record = {
        "file": sample.key,
        "index": sample.index,
        "spec": [spec.sample_id, spec.num_crops, spec.text_tokens, spec.output_tokens],
        "vision_runs": timing.vision_runs,
        "prefill_runs": timing.prefill_runs,
        "decode_runs": timing.decode_runs,
        "total_runs": timing.total_runs,
        "metadata": sample.metadata,
    }
    return json.dumps(record, allow_nan=False, separators=(",", ":"))


def parse_sample_line(line: str) -> JournaledSample:
    """A journal line back as a sample; ValueError (or KeyError, TypeError) if it is not one."""
    record = json.loads(line)
    sample_id, num_crops, text_tokens, output_tokens = (int(v) for v in record["spec"])
    spec = SampleSpec(sample_id, num_crops, text_tokens, output_tokens)
    total_runs = _runs(record["total_runs"], None, "total_runs")
    repeats = len(total_runs)
    decode = record["decode_runs"]
    if not isinstance(decode, list) or len(decode) != max(output_tokens - 1, 0):
        raise ValueError("decode_runs: expected one list per decode pass")
    metadata = record["metadata"]
    if not isinstance(metadata, dict):
        raise ValueError("metadata: expected an object")
    timing = SampleTiming(
        spec,
        _runs(record["vision_runs"], repeats, "vision_runs"),
        _runs(record["prefill_runs"], repeats, "prefill_runs"),
        [_runs(step, repeats, "decode_runs") for step in decode],
        total_runs,
    )
    return JournaledSample(str(record["file"]), int(record["index"]), timing, metadata)


class SampleJournal:
    """``logs/samples.jsonl`` of one sweep: read back on ``--resume``, appended to as samples
    land (one ``write`` and a flush per line), removed when the sweep completes.

    ``measurement`` (preset, device, dtype, repeats, ...) goes into the header: samples
    measured otherwise are not mixed into the same files.
    """

    def __init__(self, path: Path, measurement: dict[str, Any]) -> None:
        self.path = path
        self.measurement = measurement
        self._handle: IO[str] | None = None

    def read(self) -> tuple[list[JournaledSample], int]:
        """The journal's samples (none if it is absent) and how many lines were unreadable.

        A LatkitError if its header names other measurement settings than this sweep's.
        """
        try:
            lines = self.path.read_text(encoding="utf-8").split("\n")
        except FileNotFoundError:
            return [], 0
        except (OSError, UnicodeDecodeError) as exc:
            raise LatkitError(f"--resume: cannot read {self.path}: {exc}") from None
        # A complete file ends with a newline, so the last piece is "" or a torn line.
        torn = lines.pop()
        unreadable = 1 if torn else 0
        try:
            header = json.loads(lines[0]) if lines else None
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get("journal") != FORMAT:
            log.warning("%s has no readable header: its samples are not reused", self.path)
            return [], unreadable + len(lines)
        self._check(header.get("measurement"))
        samples: list[JournaledSample] = []
        for line in lines[1:]:
            try:
                samples.append(parse_sample_line(line))
            except (ValueError, KeyError, TypeError):
                unreadable += 1
        return samples, unreadable

    def _check(self, measured: Any) -> None:
        if measured == self.measurement:
            return
        given = measured if isinstance(measured, dict) else {}
        differing = [
            f"{name} {given.get(name)!r} (this run: {value!r})"
            for name, value in self.measurement.items()
            if given.get(name) != value
        ]
        raise LatkitError(
            f"--resume: {self.path} holds samples measured with "
            f"{', '.join(differing) or 'other settings'}; resume with the same settings, or "
            "delete it to measure those samples again"
        )

    def start(self, kept: list[JournaledSample]) -> None:
        """Rewrite the journal with its header and ``kept`` (dropping torn and stale lines,
        so that appended lines start on a line of their own), then open it for appending."""
        lines = [json.dumps({"journal": FORMAT, "measurement": self.measurement})]
        lines += [sample_line(sample) for sample in kept]
        write_text_atomic(self.path, "\n".join(lines) + "\n")
        self._handle = self.path.open("a", encoding="utf-8")

    def append(self, sample: JournaledSample) -> None:
        # Flushed, not fsynced: a killed process loses nothing flushed, and an fsync per
        # sample would cost a disk round trip between timed samples. What a power loss may
        # tear off the end is a torn last line, ignored on reading.
        assert self._handle is not None, "start() the journal first"
        self._handle.write(sample_line(sample) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
