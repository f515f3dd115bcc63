"""Rebuild tests/data/cifar10-fixture/ from the 2,000-image JPEG sample (not imported by the tests).

    python tests/data/make_fixture.py path/to/cifar10-jpeg-sample.tar.gz

Copies the first PER_CLASS files (by name) of every class of both splits, bytes unchanged, and
prints the manifest sha256 that tests/data/README.md states and tests/test_fixture_data.py checks.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "cifar10-fixture"
PER_CLASS = 30
# sha256 of the 2,000-image sample tar.gz (provenance: tests/data/README.md); refuse anything else
SAMPLE_SHA256 = "4fb85359f9a6bd6e6f58d73db9d772f9306dd7fde9f4a96c48b33dfe4852f37a"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def manifest_sha256(root: Path) -> str:
    """sha256 of `sha256sum` lines ("<hex>  ./<split>/<class>/<file>\\n") sorted by path.

    Same as: cd tests/data/cifar10-fixture && find . -name '*.jpg' | LC_ALL=C sort | xargs sha256sum | sha256sum
    """
    files = sorted(root.rglob("*.jpg"), key=lambda p: p.relative_to(root).as_posix().encode())
    lines = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  ./{p.relative_to(root).as_posix()}\n"
                    for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sample", type=Path, help="cifar10-jpeg-sample.tar.gz")
    args = parser.parse_args(argv)
    digest = hashlib.sha256(args.sample.read_bytes()).hexdigest()
    if digest != SAMPLE_SHA256:
        sys.exit(f"{args.sample}: sha256 {digest}, expected {SAMPLE_SHA256}")
    with tarfile.open(args.sample) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        if FIXTURE.exists():
            shutil.rmtree(FIXTURE)
        for split in ("train", "test"):
            for name in CLASSES:
                prefix = f"cifar10-jpeg-sample/{split}/{name}/"
                chosen = sorted(n for n in members if n.startswith(prefix) and n.endswith(".jpg"))[:PER_CLASS]
                if len(chosen) != PER_CLASS:
                    sys.exit(f"{prefix}: {len(chosen)} files, expected at least {PER_CLASS}")
                folder = FIXTURE / split / name
                folder.mkdir(parents=True)
                for member in chosen:
                    (folder / Path(member).name).write_bytes(tar.extractfile(members[member]).read())
    n = sum(1 for _ in FIXTURE.rglob("*.jpg"))
    size = sum(p.stat().st_size for p in FIXTURE.rglob("*.jpg"))
    print(f"{FIXTURE.relative_to(HERE.parents[1])}: {n} JPEGs, {size} bytes, "
          f"manifest sha256 {manifest_sha256(FIXTURE)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
