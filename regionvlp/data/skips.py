"""Skip counting: bad input never raises, it is skipped and counted by reason.

Every stage of the data path (the tar reader, sample decoding, the QA stage) counts what
it drops in one :class:`SkipCounter` by a reason of :data:`SKIP_REASONS`; each batch
carries the counts its worker gathered since its previous batch (``skipped``).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from regionvlp.config import mask_secrets


log = logging.getLogger(__name__)

SKIP_REASONS = {
    "unreadable_shard": "the shard could not be opened or read (after retries)",
    "corrupt_shard": "the tar stream broke off or is not a tar (samples after the break are lost)",
    "bad_json": "the sample's json is not valid JSON / not an object",
    "status_not_success": "json.status is present and not 'success' (failed download)",
    "no_media": "no mp4/webm/mkv/avi/mov/jpg/png/webp/regions.bin/regions.npz/frameNNN.jpg in the sample",
    "no_caption": "no txt and no json caption",
    "corrupt_media": "the video/image/stored-frame bytes do not decode (corrupt, truncated, unknown codec)",
    "empty_video": "the video has zero frames, zero bytes or no video stream",
    "corrupt_regions": "regions.bin/.npz is unreadable or its arrays do not match (or declare more bytes than "
                       "the member holds)",
    "nonfinite_regions": "a region sample holds NaN or Inf features, boxes or scores (they would poison the batch's "
                         "step)",
    "no_qa": "QA run: the json has no 'qa' list and no 'question'/'answer' pair",
    "bad_qa": "QA run: a question/answer pair with an empty question or no answer (the pair is skipped)",
    "qa_answer_not_in_vocab": "QA training: the answer is not in the answer vocabulary (the pair is skipped)",
    "region_shape": "a region sample has another K, feature size or dtype than the config (model.detector.num_regions, "
                    "model.region_transformer.feature_dim) or the stream's first region sample",
    "no_frames": "regions extract / detector fit / show: a region-shard sample has no frames to look at",
    "oversize": "the sample's tar members (header members included) exceed data.max_sample_bytes (from the tar "
                "headers, never read) or its image exceeds data.max_image_pixels",
}
MAX_BAD_RECORDS = 1000


@dataclass
class SkipCounter:
    """Skip counts by reason: ``total`` since the start, ``pending`` since the last
    :meth:`pop`, and the first bad samples (key, reason, url, detail)."""

    total: Counter = field(default_factory=Counter)
    pending: Counter = field(default_factory=Counter)
    bad: list[dict[str, str]] = field(default_factory=list)
    shards: int = 0  # shards that gave samples (or were read whole and empty)
    samples: int = 0  # good samples produced
    captions_cut: int = 0  # captions cut to data.max_caption_chars (the samples are kept)

    def add(self, reason: str, key: str = "", url: str = "", detail: str = "") -> None:
        url, detail = mask_secrets(url), mask_secrets(detail)  # a token read from the environment stays hidden
        self.total[reason] += 1
        self.pending[reason] += 1
        if len(self.bad) < MAX_BAD_RECORDS:
            self.bad.append({"key": key, "reason": reason, "url": url, "detail": detail})
        if sum(self.total.values()) <= 20:
            log.warning("skipped %s (%s): %s", key or url, reason, detail)

    def pop(self) -> dict[str, int]:
        out = dict(self.pending)
        self.pending.clear()
        return out

    @property
    def skipped(self) -> dict[str, int]:
        return dict(self.total)


def short_error(err: BaseException) -> str:
    """``err`` as one line of at most 300 characters (a skip record's ``detail``)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:300]
