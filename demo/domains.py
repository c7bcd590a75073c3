"""Two domains cut from the demo's images, for measuring adaptation (benchmarks/bench_adapt.py).

The source domain is six of the demo's eight photographs, the target the other two (by default the two
medical images, "ihc" and "retina": the kind of domain users adapt to). Each domain is an ImageFolder
tree of symbolic links into the demo's own trees, with the demo's train/val split.
"""

from __future__ import annotations

from pathlib import Path

from revq_pipe.demo.images import SPLITS

TARGET_CLASSES = ("ihc", "retina")


def write_domain_split(images: Path, out: Path, target: tuple[str, ...] = TARGET_CLASSES) -> dict[str, list[str]]:
    """out/{source,target}/{train,val}/<class> -> images/{train,val}/<class>; returns each domain's classes."""
    classes = sorted(p.name for p in (images / "train").iterdir() if p.is_dir())
    missing = [name for name in target if name not in classes]
    if missing or len(target) >= len(classes):
        raise ValueError(f"target classes {list(target)} must be some of the demo's {classes}; missing {missing}")
    domains = {"source": [c for c in classes if c not in target], "target": list(target)}
    for domain, members in domains.items():
        for split in SPLITS:
            folder = out / domain / split
            folder.mkdir(parents=True, exist_ok=True)
            for name in members:
                link = folder / name
                if not link.exists():
                    link.symlink_to((images / split / name).resolve(), target_is_directory=True)
    return domains
