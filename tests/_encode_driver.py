"""Run stage one from a command line, for the multi-process and kill-and-resume tests.

    python tests/_encode_driver.py --images DIR --vae DIR --out STORE [--resolution 32 ...]
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_encode_driver.py ...

The real command line is `revq-pipe encode`; this driver only builds the config the same way
(load_config with flags) and calls run_encode. --unit-delay sleeps after each staged unit so a
test can kill the process between units.
"""

import argparse
import time


from revq_pipe.cache.writer import CacheWriter  # noqa: E402
from revq_pipe.stages.config import load_config  # noqa: E402
from revq_pipe.stages.encode import run_encode  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", required=True)
    parser.add_argument("--vae", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--unit-delay", type=float, default=0.0)
    args = parser.parse_args()

    if args.unit_delay:
        write_unit = CacheWriter.write_unit

        def slow_write_unit(self, *a, **kw):
            write_unit(self, *a, **kw)
            time.sleep(args.unit_delay)

        CacheWriter.write_unit = slow_write_unit

    cfg = load_config(None, [], {
        "vae.source": args.vae, "vae.device": "cpu", "data.resolution": args.resolution,
        "encode.batch_size": args.batch_size, "encode.chunk_size": args.chunk_size,
        "encode.num_workers": args.workers,
    })
    manifest = run_encode(cfg, split=args.split, images=args.images, out=args.out, overwrite=args.overwrite)
    print(f"done {manifest.num_samples} samples, {manifest.skipped['count']} skipped")


if __name__ == "__main__":
    main()
