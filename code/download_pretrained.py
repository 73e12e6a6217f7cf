"""Download a published UG-MCL checkpoint (``unet_3D_dt``, 25 or 50 labelled cases) and verify it.

Run from ``code/``, like the other scripts::

    python download_pretrained.py --labeled_num 25
    python download_pretrained.py --labeled_num 50 --out_dir ../model --force
    python download_pretrained.py --labeled_num 25 --base_url https://my.mirror/UG-MCL   # or a local folder

The file lands at ``<out_dir>/BraTs2019_UGMCL_{n}/unet_3D_dt/unet_3D_dt_best_model.pth``, where ``test_3D_dt.py``
looks for it, only after its git blob id matches SPEC section 2 and it loads as a plain ``state_dict`` with
``torch.load(weights_only=True)``. A file already there that verifies is kept. One that does not (a model you
trained, another download) is left alone and the run fails, naming it; ``--force`` replaces it, and even then
only once the new file is downloaded and verified: a failed download never removes anything.
The final path is printed on stdout (progress and notes go to stderr), so ``ckpt=$(python download_pretrained.py
--labeled_num 25)`` works. Exit status: 0 on success, 1 on a failed download or check, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from utils.atomic import check_writable
from utils.checkpoint import (
    PUBLISHED_BASE_URL,
    PUBLISHED_CHECKPOINTS,
    CheckpointError,
    download_file,
    git_blob_id,
    published_checkpoint_path,
    published_checkpoint_url,
)


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (defaults: the original repository, ``../model``)."""
    parser = argparse.ArgumentParser(
        description="Download a published UG-MCL unet_3D_dt checkpoint, check its git blob id and that it is a "
        "plain state_dict, and print its path.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--labeled_num", type=int, required=True, choices=sorted(PUBLISHED_CHECKPOINTS), help="labelled cases used"
    )
    parser.add_argument(
        "--base_url",
        default=PUBLISHED_BASE_URL,
        help="repository root to download from; 'model/BraTs2019_UGMCL_{n}/unet_3D_dt/unet_3D_dt_best_model.pth' is "
        "appended. A mirror's http(s):// or file:// URL, or a local folder laid out the same way",
    )
    parser.add_argument("--out_dir", default="../model", help="model folder the checkpoint is saved under")
    parser.add_argument(
        "--force",
        action="store_true",
        help="download again even if a verified file is present, and replace a file there that is not the published "
        "one (e.g. a model you trained); the old file stays until the new one is verified",
    )
    parser.add_argument(
        "--expected_blob_id",
        type=_blob_id,
        default=None,
        help="git blob id (40 hex digits, as 'git hash-object' prints) to require instead of the published one; "
        "only for mirrors serving other files at the same path",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 1 download or check failed, 2 bad arguments)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) and usage errors (2): return the status instead of exiting
        return exc.code if isinstance(exc.code, int) else 2
    expected = args.expected_blob_id or PUBLISHED_CHECKPOINTS[args.labeled_num][1]
    url = published_checkpoint_url(args.labeled_num, _as_url(args.base_url))
    dest = published_checkpoint_path(args.out_dir, args.labeled_num)
    try:
        if dest.is_dir():
            raise CheckpointError(f"{dest} is a folder; expected the checkpoint file there (or nothing)")
        if dest.is_file():
            found = git_blob_id(dest)
            if found == expected and not args.force:
                print(f"{dest} is already present and verified (git blob id {found})", file=sys.stderr)
                print(dest)
                return 0
            if found != expected and not args.force:
                what = "published" if args.expected_blob_id is None else "requested"
                raise CheckpointError(
                    f"{dest} exists and is not the {what} checkpoint (git blob id {found}, expected {expected}), "
                    "e.g. a model you trained; left as it is. Pass --force to replace it, or --out_dir to download "
                    "elsewhere"
                )
            print(f"{dest} (git blob id {found}) is replaced only once the download is verified", file=sys.stderr)
        check_writable(dest)  # before the download, not after it
        print(f"downloading {url}", file=sys.stderr)
        download_file(url, dest, expected_blob_id=expected, progress=not args.no_progress, timeout=args.timeout)
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(dest)
    return 0


def _blob_id(text: str) -> str:
    value = text.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{40}", value):
        raise argparse.ArgumentTypeError(f"a git blob id is 40 hexadecimal digits, found {text!r}")
    return value


def _as_url(base: str) -> str:
    """A local folder becomes a ``file://`` URL; anything with a scheme is kept as it is."""
    if "://" in base:
        return base
    folder = Path(base).expanduser()
    if folder.is_dir():
        return folder.resolve().as_uri()
    return base  # download_file reports the missing scheme


if __name__ == "__main__":
    raise SystemExit(main())
