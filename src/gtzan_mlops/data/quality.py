"""The quality gates a decoded clip must pass to be used, by the pipeline (the fetch stage's
manifest) and by the served model alike."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gtzan_mlops.data.audio_headers import Truncation


@dataclass(frozen=True)
class QualityGates:
    """What a clip must pass to be used, by the pipeline (fetch's manifest) and by the served
    model alike: params `data.min_duration_s`, `data.silence_peak` and `data.max_peak`."""

    min_duration_s: float
    silence_peak: float
    # Samples beyond max_peak are refused, not clipped. Float files may legitimately go a bit
    # over 1.0 (headroom), but 1000 times full scale is no microphone's or encoder's output,
    # and clipping it would classify a made-up waveform. Past about 1e19 the float32 spectra
    # of the features overflow to inf (librosa then raised ParameterError: an HTTP 500).
    max_peak: float


@dataclass(frozen=True)
class QualityProblem:
    kind: str  # truncated | too_short | beyond_full_scale | silent
    message: str  # "<kind in words>: <detail>", the manifest's status


def quality_problems(
    duration_s: float, peak: float, truncation: Truncation | None, gates: QualityGates
) -> list[QualityProblem]:
    """Every gate a decoded clip fails, in the order the manifest reports them. (Not audio, and
    NaN samples, are refused by decoding itself: AudioError.)"""
    problems = []
    if truncation is not None:
        problems.append(
            QualityProblem(
                "truncated",
                f"truncated: header promises {truncation.promised_frames} frames, "
                f"file holds {truncation.held_frames}",
            )
        )
    if duration_s < gates.min_duration_s:
        problems.append(
            QualityProblem(
                "too_short",
                f"too short: {duration_s:.2f} s, min_duration_s is {gates.min_duration_s}",
            )
        )
    if peak > gates.max_peak:
        problems.append(
            QualityProblem(
                "beyond_full_scale",
                f"far beyond full scale: peak {peak:.3g}, max_peak is {gates.max_peak:g} "
                f"(+{20 * math.log10(gates.max_peak):.0f} dBFS): not audio a microphone or "
                "encoder produces",
            )
        )
    if peak < gates.silence_peak:
        problems.append(
            QualityProblem(
                "silent", f"silent: peak {peak:.3g}, silence_peak is {gates.silence_peak}"
            )
        )
    return problems
