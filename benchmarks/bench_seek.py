"""Seek, don't skip: bytes read per byte of samples used when readers start inside shards.

A CUB-sized corpus (6 shards, 5994 small samples, written by eatdist's own shard writer) is
planned for 8 ranks x 8 loader workers with ``plan_train``; every worker's segments are read

  before  from the shard's start, discarding the samples before ``start`` (WebDataset's tar
          reader, as ``iter_shard(path)`` did before shards had an index)
  after   ``iter_shard(path, start, stop)``: straight to ``start`` through the shard's index

from local files (bytes counted by the kernel: ``rchar`` of ``/proc/self/io``) and from a local
HTTP server (bytes counted as the server sends them). "used" is the bytes of the planned samples
themselves; the ratio is read / used (1.0 = nothing wasted; the goal is <= 1.1). Index files
read count as read. Not a test: prints a table.

    python benchmarks/bench_seek.py [--shards 6] [--samples 5994] [--world 8] [--workers 8] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
from collections.abc import Callable, Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from eatdist.data.plan import Segment, plan_train
from eatdist.data.shardindex import INDEX_SUFFIX
from eatdist.data.shards import AtomicShardWriter, iter_shard


def write_corpus(root: Path, shards: int, samples: int) -> list[tuple[str, int]]:
    """Write ``samples`` samples of 2-6 KB (a stand-in jpg and a json) over ``shards`` shards."""
    rng = random.Random(0)
    counts = [samples // shards + (i < samples % shards) for i in range(shards)]
    out, key = [], 0
    for s, count in enumerate(counts):
        path = root / f"train-{s:06d}.tar"
        with AtomicShardWriter(path) as writer:
            for _ in range(count):
                record = {"class": key % 200, "attributes": [round(rng.random(), 2) for _ in range(312)]}
                writer.write(
                    {
                        "__key__": f"img_{key:07d}",
                        "jpg": rng.randbytes(rng.randint(2000, 6000)),
                        "json": json.dumps(record).encode(),
                    }
                )
                key += 1
        out.append((str(path), count))
    return out


def old_iter_shard(url: str) -> Iterator[dict[str, Any]]:
    """The reader before the index: WebDataset's tar reader from the start of the shard."""
    yield from group_by_keys(tar_file_expander(url_opener([{"url": url}])))


def read_before(seg: Segment, url: str) -> int:
    used = 0
    for position, _ in enumerate(old_iter_shard(url)):
        if position >= seg.stop:
            break
        used += position >= seg.start
    return used


def read_after(seg: Segment, url: str) -> int:
    return sum(1 for _ in iter_shard(url, seg.start, seg.stop))


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


class CountingServer(ThreadingHTTPServer):
    """A static file server with Range support that counts the body bytes it sends."""

    daemon_threads = True
    sent = 0


class _Handler(SimpleHTTPRequestHandler):
    server: CountingServer

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        lo, hi, status = 0, len(data), 200
        spec = self.headers.get("Range", "")
        if spec.startswith("bytes="):
            a, _, b = spec[6:].partition("-")
            lo, hi, status = int(a), min(len(data), int(b) + 1) if b else len(data), 206
        self.send_response(status)
        self.send_header("Content-Length", str(hi - lo))
        if status == 206:
            self.send_header("Content-Range", f"bytes {lo}-{hi - 1}/{len(data)}")
        self.end_headers()
        # Counted as sent, 64 KiB at a time: a client that stops reading early (the "before"
        # reader over curl) is charged for what reached it, not for the whole file.
        for pos in range(lo, hi, 1 << 16):
            try:
                self.wfile.write(data[pos : min(hi, pos + (1 << 16))])
            except (BrokenPipeError, ConnectionResetError):
                return
            self.server.sent += min(hi, pos + (1 << 16)) - pos


def measure(
    plans: list[list[Segment]],
    locate: Callable[[str], str],
    read: Callable[[Segment, str], int],
    count: Callable[[], int],
) -> tuple[int, int]:
    before, samples = count(), 0
    for segments in plans:
        for seg in segments:
            samples += read(seg, locate(seg.path))
    return count() - before, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--samples", type=int, default=5994)
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = write_corpus(root, args.shards, args.samples)
        offsets = {p: json.loads(Path(p + INDEX_SUFFIX).read_text())["offsets"] for p, _ in shards}
        plans = [
            plan
            for rank in range(args.world)
            for plan in plan_train(
                shards, world=args.world, rank=rank, workers=args.workers, batch_size=args.batch, seed=0, epoch=0
            )
        ]
        segments = [seg for plan in plans for seg in plan]
        used_bytes = sum(offsets[s.path][s.stop] - offsets[s.path][s.start] for s in segments)
        used_samples = sum(s.count for s in segments)
        mid = sum(s.start > 0 for s in segments)
        kib = sum(Path(p).stat().st_size for p, _ in shards) >> 10
        print(
            f"corpus: {args.shards} shards, {args.samples} samples, {kib} KiB; "
            f"plan: {args.world} ranks x {args.workers} workers, batch {args.batch}: "
            f"{len(segments)} segments ({mid} start inside a shard), {used_samples} samples used"
        )

        server = CountingServer(("127.0.0.1", 0), partial(_Handler, directory=tmp))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            rows = []
            for source, locate, count in (
                ("local", lambda p: p, rchar),
                ("http", lambda p: f"{base}/{Path(p).name}", lambda: server.sent),
            ):
                for mode, read in (("before", read_before), ("after", read_after)):
                    read_bytes, samples = measure(plans, locate, read, count)
                    assert samples == used_samples, (mode, samples, used_samples)
                    rows.append((source, mode, read_bytes, read_bytes / used_samples, read_bytes / used_bytes))
        finally:
            server.shutdown()
            server.server_close()

    print(f"{'source':<7} {'reader':<7} {'bytes read':>12} {'bytes/sample used':>18} {'read / used':>12}")
    for source, mode, read_bytes, per_sample, ratio in rows:
        print(f"{source:<7} {mode:<7} {read_bytes:>12,} {per_sample:>18,.0f} {ratio:>11.2f}x")
    print(f"(used: {used_bytes:,} bytes of samples, {used_bytes / used_samples:,.0f} per sample)")


if __name__ == "__main__":
    main()
