#!/usr/bin/env bash
# Local photos on fal against the simulator: N distinct photos of SIZE bytes (a small PNG
# padded with random bytes, so each is distinct and the simulator reads only the header), one
# night that uploads them all, a second night of new rows on the same photos.
# Prints: night 1 wall time, bytes uploaded, upload throughput; night 2 wall time and bytes
# uploaded (the target is 0). Usage: bench/uploads.sh [N] [SIZE]; BACKDROP_BIN picks the binary
# (default: the debug build under $CARGO_TARGET_DIR or target/).
set -euo pipefail
N=${1:-1000}
SIZE=${2:-2000000}
BIN=${BACKDROP_BIN:-${CARGO_TARGET_DIR:-target}/debug/backdrop}
WORK=$(mktemp -d)
SIM_PID=
cleanup() { [ -n "$SIM_PID" ] && kill "$SIM_PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
BASE=http://127.0.0.1:$PORT
python3 - "$WORK" "$N" "$SIZE" <<'PY'
import os, struct, sys, zlib
work, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
raw = b"".join(b"\0" + b"\x80" * 64 * 3 for _ in range(64))
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0)) \
    + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
os.makedirs(f"{work}/photos")
for night, prefix in ((1, "A"), (2, "B")):
    with open(f"{work}/night{night}.csv", "w") as f:
        f.write("sku,name,color,image_url\n")
        for i in range(n):
            f.write(f"{prefix}{i:05},Mug {i},blue,photos/p{i:05}.png\n")
for i in range(n):
    with open(f"{work}/photos/p{i:05}.png", "wb") as f:
        f.write(png + os.urandom(size - len(png)))
PY
printf '+++\nmodel = "seedream-v4-5"\ntask = "edit"\n+++\nPlace the {color} {name} on marble\n' > "$WORK/prompt.txt"
"$BIN" -q sim --listen "127.0.0.1:$PORT" >"$WORK/sim.log" 2>&1 &
SIM_PID=$!
for _ in $(seq 100); do curl -sf "$BASE/__sim/stats" >/dev/null && break; sleep 0.1; done
stat() { curl -sf "$BASE/__sim/stats" | python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
run() {
  local start end
  start=$(date +%s.%N)
  FAL_KEY=bench "$BIN" -q run "$WORK/night$1.csv" --prompt "$WORK/prompt.txt" --provider fal \
    --api-base "$BASE" --state "$WORK/state.db" --out "$WORK/out" --concurrency 20 --rate 1000/s \
    --poll-initial 20ms --poll-max 200ms
  end=$(date +%s.%N)
  python3 -c "print(f'{$end - $start:.1f}')"
}
t1=$(run 1); b1=$(stat uploaded_bytes); u1=$(stat uploads)
t2=$(run 2); b2=$(stat uploaded_bytes); u2=$(stat uploads)
python3 - "$N" "$SIZE" "$t1" "$b1" "$u1" "$t2" "$b2" "$u2" <<'PY'
import sys
n, size, t1, b1, u1, t2, b2, u2 = sys.argv[1:]
print(f"{n} photos of {int(size)/1e6:.1f} MB, fal, --concurrency 20, against backdrop sim")
print(f"night 1: {t1} s, {u1} uploads, {int(b1)/1e6:.0f} MB uploaded, {int(b1)/1e6/float(t1):.0f} MB/s over the whole run")
print(f"night 2: {t2} s, {int(u2)-int(u1)} uploads, {int(b2)-int(b1)} bytes uploaded")
PY
