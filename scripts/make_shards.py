"""Write WebDataset tar shards (and index.json) from an image folder with class folders, captions and boxes.

    python scripts/make_shards.py --root /data/images --out /data/shards [--shard-size 1000] [--resize 288]

The folder is read as `ldm.data.image_folder.ImageFolder` reads it (sub-folder = class, sidecar .txt or
metadata.jsonl captions and boxes). Train on the shards with `ldm.data.shards.ImageShards`:

    data.params.train={target: ldm.data.shards.ImageShards, params: {root: /data/shards, size: 256}}

Bad input (missing folder, no images, an out folder that already holds shards) exits with status 2 and a
message naming the path; unreadable pictures are skipped with a warning and listed in index.json.
"""
import argparse
import sys

from ldm.data.shard_writer import write_shards


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="image folder (ImageFolder layout)")
    parser.add_argument("--out", required=True, help="empty (or new) folder for the shards and index.json")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--resize", type=int, default=None,
                        help="resize the shorter side to this many pixels and re-encode (JPEG quality 95 for "
                             "JPEGs, PNG otherwise; default: keep each file's bytes)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the one-off shuffle across shards")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the folder's sorted order")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        write_shards(args.root, args.out, shard_size=args.shard_size, resize=args.resize, seed=args.seed,
                     shuffle=not args.no_shuffle)
    except (OSError, ValueError) as err:
        print(f"make_shards.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
