"""How well annotation ids matched the videos on disk, said out loud.

A join between annotation ids and video files (``shards write --qa``, ``datasets
prepare``) that matched nothing is an error; one that matched under half of the ids is a
warning on stderr (and in the summary) naming the first unmatched ids and the existing
file names nearest to them, so a naming mismatch (``vid7`` vs ``video7``, a missing
mapping file) is seen at once instead of after a training run on nothing. A write that
wrote nothing is an error naming the counts and the likely cause; a manifest row whose
caption is a list with an integer ``answer`` is a multiple-choice question.
"""

from __future__ import annotations

import difflib
import sys
from typing import Any, Optional, Sequence

from regionvlp.errors import UserError


LOW_MATCH_RATE = 0.5
SHOW_IDS = 5
MAX_NAMES_COMPARED = 20000  # nearest-name search over at most this many file names


def nearest_names(ids: Sequence[str], names: Sequence[str], n: int = SHOW_IDS) -> list[str]:
    """For each of the first ``n`` ids, the existing name most like it (difflib ratio)."""
    pool = list(names)[:MAX_NAMES_COMPARED]
    out: list[str] = []
    for vid in list(ids)[:n]:
        best = difflib.get_close_matches(str(vid), pool, n=1, cutoff=0.0)
        if best and best[0] not in out:
            out.append(best[0])
    return out


def match_report(matched: int, total: int, unmatched: Sequence[str], names: Sequence[str]) -> dict[str, Any]:
    """``matched``/``annotated``/``match_rate`` and, when some ids matched nothing, the
    first unmatched ids and the nearest existing names."""
    report: dict[str, Any] = {"annotated": total, "matched": matched,
                              "match_rate": round(matched / total, 4) if total else 0.0}
    if unmatched:
        report["first_unmatched"] = [str(u) for u in list(unmatched)[:SHOW_IDS]]
        report["nearest_names"] = nearest_names(unmatched, names)
    return report


def _examples(report: dict[str, Any]) -> str:
    first = ", ".join(report.get("first_unmatched", [])) or "-"
    near = ", ".join(report.get("nearest_names", [])) or "none"
    return f"first unmatched ids: {first}; nearest existing names: {near}"


def check_match(report: dict[str, Any], what: str, hint: str) -> dict[str, Any]:
    """Raise :class:`UserError` when nothing matched; warn (stderr and ``report["warning"]``)
    when fewer than half of the ids matched. Returns ``report``."""
    matched, total = report["matched"], report["annotated"]
    if total and matched == 0:
        raise UserError(f"{what}: 0 of {total} annotated ids matched a video ({_examples(report)}); {hint}")
    if total and matched / total < LOW_MATCH_RATE:
        msg = (f"{what}: only {matched} of {total} annotated ids ({100 * matched / total:.1f} %) matched a video; "
               f"{_examples(report)}")
        report["warning"] = msg
        print(f"regionvlp: warning: {msg}", file=sys.stderr)
    return report


QA_JOIN_HINT = ("the annotation video ids must name the clips' files or a manifest video_id column; MSVD-QA's vidN "
                "ids need MSVD's youtube_mapping.txt: use `regionvlp datasets prepare msvd_qa` (or msrvtt_qa)")


LIKELY_CAUSE = {
    "missing_video": "the video paths name files that do not exist (relative paths resolve against the manifest's folder)",
    "missing_caption": "no caption column/.txt sidecar and no QA pairs",
    "undecodable_video": "the files are not videos PyAV can decode",
    "bad_mc_question": "multiple-choice rows whose answer is not an index into their options",
}


def check_written(samples: int, inputs: int, skipped: dict[str, int], command: str) -> None:
    """A write that wrote no sample is a :class:`UserError` naming the counts and the likely cause."""
    if samples:
        return
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items(), key=lambda kv: -kv[1])) or "no inputs"
    top = max(skipped, key=lambda k: skipped[k]) if skipped else ""
    cause = LIKELY_CAUSE.get(top, "see skipped.jsonl in the output folder")
    raise UserError(f"{command}: 0 of {inputs} inputs written ({counts}); likely cause: {cause}")


def mc_captions(value: Any, extra: dict[str, Any]) -> Optional[list[str]]:
    """A row whose caption field is a list and which has an integer ``answer`` (and no
    ``options``) is a multiple-choice question: the list goes into ``extra["options"]``
    and the caption is the right option only, never the distractors. None for other rows;
    a malformed question leaves ``extra["mc_error"]`` (the input is skipped, counted as
    ``bad_mc_question``)."""
    answer = extra.get("answer")
    if not isinstance(value, list) or not isinstance(answer, int) or isinstance(answer, bool) or "options" in extra:
        return None
    options = [" ".join(str(v).split()) for v in value]
    if len(options) < 2 or not all(options) or not 0 <= answer < len(options):
        extra["mc_error"] = f"answer {answer} with {len(options)} options (need 2+ non-empty options, 0 <= answer < n)"
        return []
    extra["options"] = options
    return [options[answer]]
