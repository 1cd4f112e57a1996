"""Hostile images against a real `vlltr serve`: every one gets a defined answer (a prediction or its 4xx with the
JSON error envelope), never a 5xx, alone or inside a batch, and the server's memory stays bounded throughout.

The server runs with a pixel budget of 4 megapixels, so "bounded" has a number: no decode may allocate more
than a few times 4 M pixels x 4 bytes, and the decode pool has one thread per core.
"""

from __future__ import annotations

import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps
from prometheus_client.parser import text_string_to_metric_families

from bench.soak.load import rss_bytes
from bench.soak.soak import MIB, RssSampler

MAX_PIXELS = 4_000_000
# Allowed RSS above the post-warm-up baseline, at the peak of the hostile barrage and after it. The largest
# legitimate decode is MAX_PIXELS pixels: ~4 MB as L, 12 MB as RGB, 16 MB as RGBA plus resize buffers, per
# decode thread (2 here); the peak bound leaves room for allocator slack on top of that.
PEAK_GROWTH_MB = 256
FINAL_GROWTH_MB = 128


# ---- builders ------------------------------------------------------------------------------------------------


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_raw(
    width: int, height: int, *, colour_type: int = 0, depth: int = 8, rows: int | None = None, extra: bytes = b""
) -> bytes:
    """A PNG with the given header whose pixel data is `rows` all-zero rows, compressed as it streams.

    `rows=None` writes every row (a real, decodable image: at 8-bit grey a 2000x2000 one is ~4 MB of
    pixels from ~4 KB of file); fewer rows make a header that promises more than the file holds.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = b"\x00" + bytes(width * channels * depth // 8)
    comp = zlib.compressobj(9)
    body = bytearray()
    for _ in range(height if rows is None else rows):
        body += comp.compress(row)
    body += comp.flush()
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + _chunk(b"IDAT", bytes(body)) + _chunk(b"IEND", b"")


def _gif_huge_screen() -> bytes:
    """A GIF whose logical screen is 65535 x 65535 holding one 1 x 1 frame."""
    header = b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return header + frame + b"\x3b"


def _jpeg_huge_header() -> bytes:
    """A small JPEG whose SOF0 marker is patched to claim 65500 x 65500 pixels."""
    data = bytearray(_save(_noise(16, 16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 65500, 65500)
    return bytes(data)


def _bmp_huge_header() -> bytes:
    data = bytearray(_save(_noise(4, 4), "BMP"))
    data[18:26] = struct.pack("<ii", 60000, 60000)
    return bytes(data)


def _animated_gif() -> tuple[bytes, bytes]:
    """A 3-frame animated GIF and its first frame (as decoded by Pillow) saved losslessly as PNG."""
    frames = [_noise(48, 40, seed=s).convert("P", palette=Image.Palette.ADAPTIVE) for s in range(3)]
    gif = _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
    with Image.open(io.BytesIO(gif)) as decoded:
        first = _save(decoded.convert("RGB"), "PNG")
    return gif, first


def _exif_pair() -> tuple[bytes, bytes]:
    """A PNG carrying EXIF orientation 6 (display rotated 90 degrees clockwise) and the same picture stored
    already rotated, without EXIF: the service must see them as the same image."""
    img = _noise(60, 36, seed=7)
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged = _save(img, "PNG", exif=exif.tobytes())
    upright = _save(ImageOps.exif_transpose(Image.open(io.BytesIO(tagged))), "PNG")
    return tagged, upright


def _palette_with_transparency() -> bytes:
    img = _noise(32, 32, seed=3).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _save(img, "PNG", transparency=0)


def _png16() -> bytes:
    arr = (np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50).astype(np.uint16)
    return _save(Image.fromarray(arr), "PNG")  # uint16 -> mode I;16


def _exif_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 8
    return _save(_noise(50, 30, seed=5), "JPEG", exif=exif.tobytes())


def _broken_exif_jpeg() -> bytes:
    # An APP1 "Exif" segment of garbage: the picture is fine, its metadata is not.
    jpeg = _save(_noise(24, 24, seed=6), "JPEG")
    payload = b"Exif\x00\x00" + b"MM\x00\x2a\x00\x00\x00\x08" + b"\xff" * 40
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def _ztxt_bomb() -> bytes:
    # 64 MB of text compressed into a zTXt chunk ahead of the pixels.
    text = b"Comment\x00\x00" + zlib.compress(bytes(64 * 1024 * 1024), 9)
    return _png_raw(8, 8, extra=_chunk(b"zTXt", text))


JPEG = _save(_noise(64, 64, seed=1), "JPEG")
PNG = _save(_noise(64, 64, seed=2), "PNG")
ANIMATED_GIF, ANIMATED_GIF_FIRST = _animated_gif()
EXIF_TAGGED, EXIF_UPRIGHT = _exif_pair()

SVG = (
    b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
    b'<rect width="10" height="10"/></svg>'
)

# (label, bytes, expected status, expected error code or None for a prediction)
HOSTILE: list[tuple[str, bytes, int, str | None]] = [
    ("zero bytes", b"", 400, "bad_image"),
    ("truncated JPEG", JPEG[: len(JPEG) // 2], 400, "bad_image"),
    ("JPEG without its end", JPEG[:-200], 400, "bad_image"),
    ("truncated PNG", PNG[: len(PNG) // 2], 400, "bad_image"),
    ("PNG signature only", PNG[:8], 400, "bad_image"),
    ("text named .jpg", b"hello, I am a text file pretending to be a photo\n" * 20, 400, "bad_image"),
    ("PNG of 0 x 0 pixels", _png_raw(0, 0, rows=0), 400, "bad_image"),
    # The pixel stream ends early but cleanly: Pillow (like browsers) fills the rest, so it is a prediction.
    ("PNG whose pixel data stops early", _png_raw(1000, 1000, rows=3), 200, None),
    ("PNG bomb 100000 x 100000 header", _png_raw(100_000, 100_000, rows=1), 413, "too_large"),
    ("PNG bomb 3000 x 3000 of zeros", _png_raw(3000, 3000), 413, "too_large"),
    ("GIF bomb 65535 x 65535 screen", _gif_huge_screen(), 413, "too_large"),
    ("JPEG header claiming 65500 x 65500", _jpeg_huge_header(), 413, "too_large"),
    ("BMP header claiming 60000 x 60000", _bmp_huge_header(), 413, "too_large"),
    ("PNG with a 64 MB zTXt bomb", _ztxt_bomb(), 400, "bad_image"),
    ("SVG", SVG, 415, "unsupported_type"),
    (
        "PDF",
        b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
        415,
        "unsupported_type",
    ),
    ("HEIC", struct.pack(">I", 24) + b"ftypheic" + b"\x00\x00\x00\x00mif1heic" + bytes(64), 415, "unsupported_type"),
    ("PPM", _save(_noise(8, 8), "PPM"), 415, "unsupported_type"),
    ("ICO", _save(_noise(16, 16), "ICO"), 415, "unsupported_type"),
    ("EPS", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", 415, "unsupported_type"),
    # Decodable oddities: each gets a prediction.
    ("1 x 1 PNG", _save(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), 200, None),
    ("20000 x 20 strip", _save(_noise(20000, 20, seed=4), "PNG"), 200, None),
    ("20 x 20000 strip", _save(_noise(20, 20000, seed=4), "JPEG"), 200, None),
    ("PNG 2000 x 2000 of zeros (within the budget)", _png_raw(2000, 2000), 200, None),
    ("animated GIF", ANIMATED_GIF, 200, None),
    ("16-bit greyscale PNG", _png16(), 200, None),
    ("CMYK JPEG", _save(_noise(40, 40, seed=8, mode="CMYK"), "JPEG"), 200, None),
    ("palette PNG with transparency", _palette_with_transparency(), 200, None),
    ("RGBA PNG", _save(_noise(30, 30, seed=9, mode="RGBA"), "PNG"), 200, None),
    ("LA PNG", _save(_noise(30, 30, seed=9, mode="LA"), "PNG"), 200, None),
    ("1-bit BMP", _save(_noise(30, 30, seed=9, mode="1"), "BMP"), 200, None),
    ("EXIF-rotated JPEG", _exif_jpeg(), 200, None),
    ("EXIF-rotated PNG", EXIF_TAGGED, 200, None),
    ("JPEG with a corrupt EXIF block", _broken_exif_jpeg(), 200, None),
    (
        "animated WebP",
        _save(_noise(20, 20, seed=1), "WEBP", save_all=True, append_images=[_noise(20, 20, seed=2)]),
        200,
        None,
    ),
    (
        "multi-page TIFF",
        _save(_noise(20, 20, seed=1), "TIFF", save_all=True, append_images=[_noise(20, 20, seed=2)]),
        200,
        None,
    ),
    (
        "float TIFF",
        _save(Image.fromarray(np.linspace(0, 1, 400, dtype=np.float32).reshape(20, 20), "F"), "TIFF"),
        200,
        None,
    ),
]


@pytest.fixture(scope="module")
def server(service_bundle, server_factory, tmp_path_factory):
    env = {"VLLTR_MAX_PIXELS": str(MAX_PIXELS), "VLLTR_PREPROCESS_THREADS": "2"}
    srv = server_factory(
        env=env, args=["--bundle", str(service_bundle)], workdir=tmp_path_factory.mktemp("hostile-images")
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def baseline_rss(server, client):
    # Warm the allocator with ordinary traffic first, so the baseline is a serving process, not a fresh one.
    for _ in range(20):
        assert client.post("/v1/classify", files={"file": ("a.png", PNG)}).status_code == 200
    return rss_bytes(server.pid)


def _check(r: httpx.Response, status: int, code: str | None, label: str) -> None:
    assert r.status_code == status, f"{label}: {r.status_code} {r.text[:300]}"
    body = r.json()
    if code is None:
        assert body["predictions"], label
        assert abs(sum(p["score"] for p in body["predictions"]) - 1.0) < 1e-3 or len(body["predictions"]) < 6
    else:
        assert set(body) == {"error"} and body["error"]["code"] == code, f"{label}: {body}"
        assert body["error"]["message"]


@pytest.mark.parametrize("label,data,status,code", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_image_gets_a_defined_answer(client, baseline_rss, reliability_log, label, data, status, code):
    r = client.post("/v1/classify", params={"top_k": 6}, files={"file": ("upload.jpg", data, "image/jpeg")})
    reliability_log.add("hostile images", inputs=1, requests=1, errors=int(r.status_code >= 500))
    _check(r, status, code, label)


def test_hostile_images_fail_alone_inside_one_batch(client, reliability_log):
    files = [("files", (f"{i}.jpg", data)) for i, (_, data, _, _) in enumerate(HOSTILE)]
    r = client.post("/v1/classify/batch", files=files)
    reliability_log.add("hostile images", requests=1, inputs=len(files), errors=int(r.status_code >= 500))
    assert r.status_code == 200, r.text[:300]
    results = r.json()["results"]
    assert [item["index"] for item in results] == list(range(len(HOSTILE)))
    for item, (label, _, status, code) in zip(results, HOSTILE):
        assert item["status"] == status, (label, item)
        assert (item["error"] or {}).get("code") == code, (label, item)
        assert (item["predictions"] is not None) == (code is None), (label, item)


def test_animated_gif_is_classified_by_its_first_frame(client):
    gif = client.post("/v1/classify", params={"top_k": 6}, files={"file": ("a.gif", ANIMATED_GIF)}).json()
    first = client.post("/v1/classify", params={"top_k": 6}, files={"file": ("f.png", ANIMATED_GIF_FIRST)}).json()
    assert [p["class_id"] for p in gif["predictions"]] == [p["class_id"] for p in first["predictions"]]
    for a, b in zip(gif["predictions"], first["predictions"]):
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_exif_orientation_is_applied(client):
    tagged = client.post("/v1/classify", params={"top_k": 6}, files={"file": ("t.png", EXIF_TAGGED)}).json()
    upright = client.post("/v1/classify", params={"top_k": 6}, files={"file": ("u.png", EXIF_UPRIGHT)}).json()
    assert [(p["class_id"], round(p["score"], 5)) for p in tagged["predictions"]] == [
        (p["class_id"], round(p["score"], 5)) for p in upright["predictions"]
    ]


def test_memory_stays_bounded_under_a_hostile_barrage(server, client, baseline_rss, reliability_log):
    # Every hostile input five times, eight at a time, while the server's RSS is sampled.
    jobs = [(label, data, status, code) for label, data, status, code in HOSTILE] * 5

    def send(job):
        label, data, status, code = job
        with httpx.Client(base_url=server.url, timeout=120) as c:
            r = c.post("/v1/classify", files={"file": ("x", data)})
        return label, r.status_code, status

    with RssSampler(server.pid, interval=0.05) as sampler, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, jobs))
    final = rss_bytes(server.pid)
    reliability_log.add(
        "hostile images", requests=len(jobs), inputs=len(jobs), errors=sum(got >= 500 for _, got, _ in answers)
    )
    wrong = [(label, got, want) for label, got, want in answers if got != want]
    assert not wrong, wrong
    peak_growth = (max(sampler.peak, final) - baseline_rss) / MIB
    final_growth = (final - baseline_rss) / MIB
    reliability_log.note("hostile images RSS growth MiB (peak, final)", [round(peak_growth, 1), round(final_growth, 1)])
    assert peak_growth < PEAK_GROWTH_MB, f"RSS grew by {peak_growth:.0f} MiB at the peak"
    assert final_growth < FINAL_GROWTH_MB, f"RSS stayed {final_growth:.0f} MiB above the baseline"
    assert server.alive()


def test_no_hostile_image_was_ever_answered_5xx(client):
    assert client.get("/readyz").status_code == 200
    statuses = set()
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name == "vlltr_request_duration_seconds":
            statuses |= {
                (s.labels["route"], s.labels["status"])
                for s in family.samples
                if s.name.endswith("_count") and s.value > 0
            }
    fives = {pair for pair in statuses if pair[1].startswith("5")}
    assert fives <= {("/readyz", "503")}, fives


# ---- many large uploads at once ----------------------------------------------------------------------------

BUDGET_FILE_BYTES = 256 * 1024
BUDGET_BYTES = 40 * 1024 * 1024  # two 64-file batches of 256 KB images fit at once, a third does not


@pytest.fixture(scope="module")
def budget_server(service_bundle, server_factory, tmp_path_factory):
    # The image queue is made large so that only the body budget can hold this flood back.
    env = {
        "VLLTR_MAX_IMAGE_BYTES": str(BUDGET_FILE_BYTES),
        "VLLTR_MAX_BUFFERED_BYTES": str(BUDGET_BYTES),
        "VLLTR_RETRY_AFTER_S": "3",
        "VLLTR_QUEUE_SIZE": "4096",
    }
    srv = server_factory(env=env, args=["--bundle", str(service_bundle)], workdir=tmp_path_factory.mktemp("budget"))
    yield srv
    srv.stop()


def test_concurrent_large_uploads_are_bounded_by_the_body_budget(budget_server, reliability_log):
    # Sixteen 16 MB batch uploads at once would hold 256 MB of bodies; the budget admits two at a time and
    # answers the rest 503 + Retry-After at once, so memory stays near the budget, not near the demand.
    srv = budget_server
    blob = bytes(np.random.default_rng(0).integers(0, 256, BUDGET_FILE_BYTES - 512, dtype=np.uint8))
    files = [("files", (f"{i}.jpg", blob)) for i in range(64)]
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        for _ in range(3):
            assert c.post("/v1/classify/batch", files=files[:4]).status_code == 200
    baseline = rss_bytes(srv.pid)

    def send(_):
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            r = c.post("/v1/classify/batch", files=files)
        return r.status_code, r.headers.get("retry-after"), (r.json().get("error") or {}).get("code")

    with RssSampler(srv.pid, interval=0.05) as sampler, ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(send, range(16)))
    growth = (max(sampler.peak, rss_bytes(srv.pid)) - baseline) / MIB
    reliability_log.add(
        "hostile images", requests=16 + 3, inputs=16, errors=sum(s >= 500 and s != 503 for s, _, _ in answers)
    )
    reliability_log.note(
        "large concurrent uploads: RSS growth MiB, answers", [round(growth, 1), sorted(s for s, _, _ in answers)]
    )
    assert {s for s, _, _ in answers} <= {200, 503}, answers
    assert any(s == 200 for s, _, _ in answers) and any(s == 503 for s, _, _ in answers), answers
    assert all(ra == "3" and code == "queue_full" for s, ra, code in answers if s == 503), answers
    # Bodies held at once never exceed the budget; decoding and allocator slack come on top.
    assert growth < BUDGET_BYTES / MIB + 96, f"RSS grew by {growth:.0f} MiB under a {BUDGET_BYTES // MIB} MiB budget"

    with httpx.Client(base_url=srv.url, timeout=120) as c:
        # Every byte was given back: one upload at a time is always admitted afterwards.
        for _ in range(6):
            r = c.post("/v1/classify/batch", files=files)
            assert r.status_code == 200, r.text[:200]
        # One request larger than the whole budget can never fit: 413, with or without a Content-Length.
        r = c.post("/v1/classify/batch", files=[("files", ("huge.jpg", bytes(BUDGET_BYTES + 1)))])
        assert r.status_code == 413, r.text[:200]

        def chunks():  # a well-formed multipart stream that just goes on
            yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="endless.jpg"\r\n\r\n'
            for _ in range(BUDGET_BYTES // (1024 * 1024) + 8):
                yield b"x" * (1024 * 1024)

        r = c.post("/v1/classify/batch", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
        assert r.status_code == 413, r.text[:200]
    reliability_log.add("hostile images", requests=8, inputs=2)
    assert srv.alive()
