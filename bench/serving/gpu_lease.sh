#!/usr/bin/env bash
# Run `python -m bench.serving.gpu` on a GPU machine that has no network and no onnxruntime-gpu.
#
#     bash bench/serving/gpu_lease.sh pack          # here, with network: fill .whl/ and .ortgpu/ to carry
#     bash bench/serving/gpu_lease.sh stage N       # once per call that carries chunk N of onnxruntime-gpu
#     bash bench/serving/gpu_lease.sh run [ARGS]    # stage what was carried, install, smoke-check, benchmark
#     bash bench/serving/gpu_lease.sh install       # only reassemble and install (what `run` does first)
#     bash bench/serving/gpu_lease.sh smoke         # only the CUDA smoke check (after `install`)
#
# Why it is built this way:
# - The machine's image has torch (CUDA 13), numpy, onnx and CPU onnxruntime, but none of the serving stack
#   (fastapi, pydantic, uvicorn, litserve, locust, open_clip, ...): those travel as wheels in `.whl/`.
# - onnxruntime-gpu 1.31.1 (CUDA 13 / cuDNN 9) is a 256 MB wheel, over what one call may carry. It travels
#   as an xz-compressed wheel (`pack`) split into
#   numbered chunks in `.ortgpu/`, with `.ortgpu/SHA256SUMS`. Each call carries one chunk; `stage` moves it
#   to $LEASE_STAGE (under /tmp, which lives as long as the machine stays warm) and checks it.
# - Everything is installed with `pip --target` into $LEASE_SITE and put first on PYTHONPATH, so it shadows
#   the image's CPU onnxruntime; the benchmark's servers, LitServe workers and Locust inherit PYTHONPATH
#   and LD_LIBRARY_PATH (bench/serving/servers.py drops only VLLTR_* variables).
# - The service never imports torch and never calls onnxruntime.preload_dlls(), whose default looks for
#   nvidia/ next to onnxruntime (here $LEASE_SITE, not the image's site-packages). So the CUDA 13 and cuDNN
#   libraries of the image's nvidia-* pip packages are put on LD_LIBRARY_PATH before any Python starts
#   (the loader reads it once, at process start).
# - The smoke check stops the run early, with the loader's view printed, when the CUDA provider is not
#   really active: a benchmark that silently measured CPU sessions would waste the lease.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${LEASE_PYTHON:-python3}"
SITE="${LEASE_SITE:-/tmp/site}"
STAGE="${LEASE_STAGE:-/tmp/ortgpu}"
WORK="${LEASE_WORK:-/tmp/vlltr-bench-gpu}"
# The benchmark's own limit (SIGINT first, so its servers are stopped and the JSON written so far stays).
BENCH_TIMEOUT="${LEASE_BENCH_TIMEOUT:-390}"
OUT="${OUT:-/tmp/vlltr-lease-out}"  # a remote runner that returns the files under $OUT sets it
CHUNKS="$REPO/.ortgpu"
SUMS="SHA256SUMS"

log() { printf '[gpu_lease %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit "${2:-1}"; }

# The archive's and the wheel's names, read from the manifest (lines "sha256  name").
archive_name() { awk '$2 ~ /\.whl\.xz$/ {print $2}' "$STAGE/$SUMS"; }
wheel_name() { awk '$2 ~ /\.whl$/ {print $2}' "$STAGE/$SUMS"; }
part_names() { awk '$2 ~ /\.part[0-9]+$/ {print $2}' "$STAGE/$SUMS"; }

# Move chunk N (and the manifest) from the carried .ortgpu/ to $STAGE and verify its checksum.
stage_part() {
  local n="$1" part
  mkdir -p "$STAGE"
  [ -f "$CHUNKS/$SUMS" ] && cp "$CHUNKS/$SUMS" "$STAGE/$SUMS"
  [ -f "$STAGE/$SUMS" ] || die "no $SUMS: carry .ortgpu/$SUMS with every chunk"
  part="$(awk -v n="$n" '$2 ~ ("\\.part" n "$") {print $2}' "$STAGE/$SUMS")"
  [ -n "$part" ] || die "$SUMS names no chunk $n"
  if [ -f "$CHUNKS/$part" ]; then
    mv -f "$CHUNKS/$part" "$STAGE/$part"
  elif [ ! -f "$STAGE/$part" ]; then
    die "chunk $n ($part) was not carried and is not staged"
  fi
  (cd "$STAGE" && grep -E "  $part\$" "$SUMS" | sha256sum -c --quiet -) || die "chunk $n is corrupt"
  log "chunk $n staged: $(sha256sum "$STAGE/$part" | cut -c1-16)... $(stat -c %s "$STAGE/$part") bytes"
}

# The wheels travel in the first call only; keep a copy beside the chunks in case later calls' trees lack them.
stage_wheels() {
  if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
    mkdir -p "$STAGE/whl"
    cp -f "$REPO"/.whl/*.whl "$STAGE/whl/"
    log "wheels staged: $(ls "$STAGE/whl" | wc -l) files"
  fi
}

show_staged() {
  local missing=0 p
  for p in $(part_names); do
    if [ -f "$STAGE/$p" ]; then log "  have $p"; else log "  MISSING $p"; missing=1; fi
  done
  return "$missing"
}

cmd_stage() {
  [ $# -eq 1 ] && [[ "$1" =~ ^[0-9]+$ ]] || die "usage: stage N"
  stage_part "$1"
  stage_wheels
  show_staged || log "more chunks to come"
}

# Stage whatever chunks this call carried, reassemble, verify, decompress and install everything.
cmd_install() {
  local f archive wheel
  if compgen -G "$CHUNKS/*.part*" >/dev/null; then
    for f in "$CHUNKS"/*.part*; do stage_part "${f##*.part}"; done
  fi
  [ -f "$CHUNKS/$SUMS" ] && { mkdir -p "$STAGE"; cp "$CHUNKS/$SUMS" "$STAGE/$SUMS"; }
  [ -f "$STAGE/$SUMS" ] || die "nothing staged in $STAGE (was the machine given back between calls?)" 3
  stage_wheels
  show_staged || die "chunks missing in $STAGE: send them again with 'stage N' (the machine may have been released)" 3
  archive="$(archive_name)"; wheel="$(wheel_name)"
  if ! (cd "$STAGE" && [ -f "$wheel" ] && grep -E "  $wheel\$" "$SUMS" | sha256sum -c --quiet - 2>/dev/null); then
    log "reassembling $archive"
    # shellcheck disable=SC2046
    cat $(part_names | sed "s|^|$STAGE/|") > "$STAGE/$archive"
    (cd "$STAGE" && grep -E "  $archive\$" "$SUMS" | sha256sum -c --quiet -) || die "reassembled archive is corrupt"
    log "decompressing to $wheel"
    # Python's lzma needs no xz binary on the image; liblzma does the work at the same speed.
    "$PY" -c 'import lzma, shutil, sys
with lzma.open(sys.argv[1]) as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 24)' "$STAGE/$archive" "$STAGE/$wheel"
    (cd "$STAGE" && grep -E "  $wheel\$" "$SUMS" | sha256sum -c --quiet -) || die "decompressed wheel is corrupt"
    rm -f "$STAGE/$archive"
  fi
  compgen -G "$STAGE/whl/*.whl" >/dev/null || die "no wheels: carry .whl in the first call"
  log "installing $(ls "$STAGE"/whl/*.whl | wc -l) wheels and $wheel into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$STAGE"/whl/*.whl "$STAGE/$wheel"
  setup_env
  check_requirements
}

# PYTHONPATH and LD_LIBRARY_PATH for this shell and everything it starts.
setup_env() {
  local purelib libs
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  # The image's site-packages (where its nvidia-* packages live), asked of the interpreter without $SITE.
  purelib="$(PYTHONPATH= "$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  libs="$(ls -d "$purelib"/nvidia/*/lib 2>/dev/null | paste -sd: - || true)"
  [ -n "$libs" ] || log "WARNING: no nvidia/*/lib under $purelib: CUDA libraries must come from elsewhere"
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export PYTHONUNBUFFERED=1
  log "PYTHONPATH=$PYTHONPATH"
  log "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
}

# Requirements of the carried wheels that the image does not meet (versions are the image's business: this
# only reports, so an unexpected import error later can be read against it).
check_requirements() {
  "$PY" - "$SITE" <<'EOF'
import sys
from importlib import metadata
from packaging.requirements import Requirement

site = sys.argv[1]
problems = []
for dist in metadata.distributions(path=[site]):
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{dist.metadata['Name']}: {req} (missing)")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            problems.append(f"{dist.metadata['Name']}: {req} (found {have})")
print("requirements of the carried wheels:", "all met" if not problems else "")
for p in sorted(set(problems)):
    print("  unmet:", p)
EOF
}

cmd_smoke() {
  [ -n "${LD_LIBRARY_PATH:-}" ] && [[ "${PYTHONPATH:-}" == "$SITE"* ]] || setup_env
  cd "$REPO"
  command -v nvidia-smi >/dev/null && nvidia-smi || log "no nvidia-smi"
  # Every module the benchmark and its servers import, and the `python -m vlltr.cli` path it starts them by.
  timeout 60 "$PY" -c 'import fastapi, uvicorn, httptools, uvloop, pydantic, pydantic_settings, python_multipart
import redis, ftfy, open_clip, litserve, prometheus_client, onnx, torch, torchvision
import vlltr.service.app, vlltr.service.cli, vlltr.training.export, bench.serving.gpu
print("imports ok; torch", torch.__version__, "cuda", torch.cuda.is_available(), "open_clip", open_clip.__version__)'
  timeout 60 "$PY" -c 'import locust, gevent; print("locust", locust.__version__, "gevent", gevent.__version__)'
  timeout 60 "$PY" -m vlltr.cli serve --help >/dev/null
  log "python -m vlltr.cli serve --help ok"
  # A tiny graph shaped like the encoders (Conv, then a dynamic-batch Reshape whose shape is computed from
  # the input, then MatMul): first on a plain CUDA session (cuDNN and cuBLAS both load), then through the
  # service's own create_session(..., "cuda"), which every service and ceiling cell of the benchmark uses.
  timeout 60 "$PY" - <<'EOF'
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

started = time.perf_counter()
print("onnxruntime", ort.__version__, "from", ort.__file__)
print("available providers:", ort.get_available_providers())
rng = np.random.default_rng(0)
init = [numpy_helper.from_array(rng.standard_normal((8, 3, 4, 4)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((8 * 8 * 8, 16)).astype(np.float32), "m"),
        numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "minus1")]
nodes = [helper.make_node("Conv", ["pixels", "w"], ["c"], strides=[4, 4]),
         helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("Shape", ["r"], ["s"]),
         helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
         helper.make_node("Unsqueeze", ["n", "axis0"], ["n1"]),
         helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
         helper.make_node("Reshape", ["r", "shape"], ["f"]),
         helper.make_node("MatMul", ["f", "m"], ["features"])]
graph = helper.make_graph(
    nodes, "smoke", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["n", 3, 32, 32])],
    [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", 16])], init)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 9
onnx.checker.check_model(model)
x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"pixels": x})[0]


def rel(y):
    return float(np.abs(y - ref).max() / max(1.0, float(np.abs(ref).max())))


sess = ort.InferenceSession(model.SerializeToString(),
                            providers=[("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"})])
y = sess.run(None, {"pixels": x})[0]
print(f"plain session providers: {sess.get_providers()}; CUDA vs CPU max relative difference {rel(y):.2e}")
ort.print_debug_info()
if sess.get_providers()[0] != "CUDAExecutionProvider" or not rel(y) < 1e-2:
    raise SystemExit("smoke check FAILED: CUDAExecutionProvider is not active or gives wrong numbers")

from vlltr.model.runtime.sessions import ImageEncoder, ProviderError  # noqa: E402

path = Path(tempfile.mkdtemp()) / "smoke.onnx"
onnx.save(model, path)
try:
    enc = ImageEncoder(path, "cuda")
except ProviderError as exc:
    raise SystemExit(f"smoke check FAILED: the service's CUDA session (vlltr.model.runtime.sessions, provider cuda) "
                     f"does not start, so every service and ceiling cell would fail:\n{exc}")
print(f"service ImageEncoder provider {enc.provider}; max relative difference {rel(enc.encode(x)):.2e}")
print(f"smoke check ok: CUDAExecutionProvider active ({time.perf_counter() - started:.1f} s)")
EOF
}

cmd_run() {
  local rc=0
  mkdir -p "$OUT"
  cmd_install 2>&1 | tee "$OUT/setup.log"
  setup_env 2>/dev/null
  # LEASE_SKIP_SMOKE=1 only for trying this script on a machine without a GPU.
  [ "${LEASE_SKIP_SMOKE:-0}" = 1 ] || cmd_smoke 2>&1 | tee -a "$OUT/setup.log"
  cd "$REPO"
  log "benchmark, at most $BENCH_TIMEOUT s"
  # SIGINT lets the script stop its servers; -k kills it if that hangs. pipefail keeps the bench's status.
  timeout -s INT -k 30 "$BENCH_TIMEOUT" "$PY" -m bench.serving.gpu --out "$OUT" --work "$WORK" "$@" 2>&1 \
    | tee "$OUT/bench.log" || rc=$?
  # Server and Locust logs (small) in one file: at most 8 files come back from $OUT.
  if [ -d "$WORK" ]; then
    (cd "$WORK" && find . -name '*.log' -print0 | tar czf "$OUT/server-logs.tgz" --null -T -) || true
  fi
  log "benchmark exit status $rc; $OUT holds: $(ls "$OUT" | paste -sd' ' -)"
  return "$rc"
}

# Here, with network (any Python with pip): the wheels and the onnxruntime-gpu chunks to carry. The wheels
# (gpu_lease.requirements.txt) are the serving and benchmark stack for CPython 3.12 (the GPU image's), without
# what the image already has (torch, numpy, onnx, the nvidia-* CUDA libraries); onnxruntime-gpu is xz-compressed and cut into chunks of
# $LEASE_CHUNK_MB (one per call, under the 64 MiB a call may carry with the working tree).
cmd_pack() {
  local chunk_mb="${LEASE_CHUNK_MB:-45}" tmp wheel
  local plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
              --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  mkdir -p "$REPO/.whl" "$CHUNKS"
  # --no-deps with a pinned list: resolving dependencies would pull torch and the CUDA libraries (gigabytes)
  # that the image already has.
  "$PY" -m pip download -q --no-deps "${plat[@]}" -d "$REPO/.whl" -r "$REPO/bench/serving/gpu_lease.requirements.txt"
  tmp="$(mktemp -d)"
  "$PY" -m pip download -q --no-deps "${plat[@]}" -d "$tmp" onnxruntime-gpu==1.31.1
  wheel="$(cd "$tmp" && ls onnxruntime_gpu-*.whl)"
  rm -f "$CHUNKS"/*
  xz -T0 -9 -c "$tmp/$wheel" > "$CHUNKS/onnxruntime_gpu-1.31.1.whl.xz"
  (cd "$CHUNKS" && split -b "${chunk_mb}M" -d -a 1 onnxruntime_gpu-1.31.1.whl.xz onnxruntime_gpu-1.31.1.whl.xz.part \
    && sha256sum onnxruntime_gpu-1.31.1.whl.xz.part* onnxruntime_gpu-1.31.1.whl.xz > "$SUMS" \
    && (cd "$tmp" && sha256sum "$wheel") >> "$SUMS" && rm onnxruntime_gpu-1.31.1.whl.xz)
  rm -rf "$tmp"
  log "$(ls "$REPO"/.whl | wc -l) wheels in .whl/, $(ls "$CHUNKS" | grep -c part) chunks in .ortgpu/: carry .whl with chunk 0"
}

main() {
  local cmd="${1:-}"
  [ $# -gt 0 ] && shift
  case "$cmd" in
    pack) cmd_pack ;;
    stage) cmd_stage "$@" ;;
    install) cmd_install ;;
    smoke) cmd_smoke ;;
    run) cmd_run "$@" ;;
    *) die "usage: $0 pack | stage N | install | smoke | run [bench args]" 2 ;;
  esac
}

main "$@"
