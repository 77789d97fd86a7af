"""LSMDC (Rohrbach et al., 2017), the LSMDC 2016 release: movie clips named
``<movie>_<start>-<end>`` (``0001_American_Beauty_00.00.51.926-00.00.54.129.avi``, in one
folder per movie), one sentence each.

Files: ``LSMDC16_annos_training.csv``, ``LSMDC16_annos_val.csv``,
``LSMDC16_annos_test.csv`` and the public retrieval test
``LSMDC16_challenge_1000_publictect.csv`` (its authors' spelling): tab-separated, no
header, six fields: clip name, aligned start, aligned end, extracted start, extracted end,
sentence (unquoted; ``"`` is text).
"""

from __future__ import annotations

from pathlib import Path

from regionvlp.data.datasets.base import Adapter, Clip, Split, add_clip, caption_list, csv_rows, split_per_file
from regionvlp.errors import UserError


ROLES = {"test": r"publictect|publictest|1000", "train": r"training|train", "val": r"_val", "test_full": r"_test"}
EXPECTED = ("LSMDC16_annos_training.csv, LSMDC16_annos_val.csv, LSMDC16_annos_test.csv, "
            "LSMDC16_challenge_1000_publictect.csv")
PROTOCOL = {
    "train": "LSMDC 2016 training clips (~101k), one sentence each",
    "val": "LSMDC 2016 validation clips (~7.4k), one sentence each",
    "test": "LSMDC public test (LSMDC16_challenge_1000_publictect.csv): 1,000 clips, one sentence each, R@K/MedR",
    "test_full": "LSMDC 2016 test clips (~10k), one sentence each",
}


def read_annos(path: Path, name: str) -> Split:
    split = Split(name, [], [path], PROTOCOL[name])
    seen: set[str] = set()
    for n, row in enumerate(csv_rows(path, delimiter="\t", header=False), 1):
        if not row or not any(f.strip() for f in row):
            continue
        if len(row) < 6:
            raise UserError(f"{path}:{n}: expected 6 tab-separated fields (clip, 4 times, sentence), got {len(row)}; "
                            "is this an LSMDC16_annos_*.csv?")
        clip_id = row[0].strip()
        add_clip(split, seen, Clip(clip_id, {"lsmdc": clip_id}, caption_list("\t".join(row[5:])),
                                   {"start_aligned": row[1], "end_aligned": row[2]}))
    return split


def read(files: list[Path]) -> dict[str, Split]:
    return split_per_file(files, ROLES, "lsmdc", EXPECTED, read_annos)


ADAPTER = Adapter(
    name="lsmdc", description="LSMDC 2016 retrieval (1,000-clip public test, train, val)", files=EXPECTED,
    splits=tuple(PROTOCOL), read=read,
    hint="LSMDC clips are named <movie>_<start>-<end>.avi in one folder per movie: point --videos at their parent")
