"""Negative photos for the concept head (`captioner concepts --negatives`): desktop wallpapers and game textures
from Debian packages, photos that show none of COCO's 80 categories and look nothing like a COCO scene.

    apt-get download gnome-backgrounds plasma-workspace-wallpapers mate-backgrounds sway-backgrounds \\
        lomiri-wallpapers ukui-wallpapers colobot-common-textures
    python scripts/concept_negatives.py *.deb -o runs/negatives

Each package's images are unpacked, screenshots, icons and tiny images dropped, one image kept per wallpaper (its
largest), the ones listed in EXCLUDED dropped (each was looked at: it shows a COCO thing or a person, or is a UI
sprite sheet), and the rest written as JPEGs of at most 1024 px. They are used to train only (the licences are
the packages': GPL, LGPL, CC BY-SA); nothing of them ships. The non-COCO check set (benchmarks/data/noncoco) comes
from other packages (scikit-image, scikit-learn, matplotlib, ...) and none of these photos is in it.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path

from PIL import Image

MIN_SIDE = 128  # smaller ones are icons and sprites
MAX_SIDE = 1024
# By name (a wallpaper's folder name or a file's stem): looked at one by one on 2026-12-07.
EXCLUDED = {
    "Autumn",  # a small figure walking: maybe a person
    "ColorfulCups",  # cups
    "Elephants",  # elephants
    "EveningGlow",  # boats
    "Kite",  # a kite
    "pixels-d", "pixels-l",  # icons of things
    "firstgeneration", "the-mouse",  # cartoon characters
}
# colobot's textures: only the natural ones (ground, sky, planets, water, wood) and every fourth of its 40
# greyscale relief maps (so that they do not outnumber the rest); its machines, faces and effects are left out.
COLOBOT_KEPT = re.compile(r"^(back|chili|cloud|desert|dirty|green|lava|mars|mix|moon|wood|planet|roca|terra|water)")
COLOBOT_RELIEF = re.compile(r"^relief(\d+)$")


def unpack(deb: Path, into: Path) -> Path:
    folder = into / deb.stem
    subprocess.run(["dpkg-deb", "-x", str(deb), str(folder)], check=True)
    return folder


def wallpaper_key(path: Path) -> str | None:
    """One name per picture: Plasma's `NAME/contents/images/WxH.ext` -> NAME (dark variants apart); else the stem
    without a size suffix. None for what is not a picture to keep."""
    if path.suffix.lower() not in {".jpg", ".jpeg", ".png", ".webp"} or "screenshot" in path.name:
        return None
    parts = path.parts
    if "wallpapers" in parts and "contents" in parts:
        name = parts[parts.index("contents") - 1]
        return name + ("-dark" if "images_dark" in parts else "")
    stem = re.sub(r"_\d+x\d+$", "", path.stem)
    if "colobot" in parts:
        if "textures" not in parts:
            return None
        relief = COLOBOT_RELIEF.match(stem)
        if relief:
            return stem if int(relief.group(1)) % 4 == 3 else None
        return stem if COLOBOT_KEPT.match(stem) else None
    if "sway" in parts:  # eight variants of one logo on blue: keep one
        return "sway" if stem.startswith("Sway_Wallpaper_Blue_1920x1080") else None
    return stem


def collect(roots: list[Path]) -> dict[str, Path]:
    """name -> its largest image file."""
    chosen: dict[str, tuple[int, Path]] = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            key = wallpaper_key(path)
            if key is None or key in EXCLUDED or not path.is_file():
                continue
            with Image.open(path) as image:
                area = image.width * image.height
                if min(image.size) < MIN_SIDE:
                    continue
            if key not in chosen or area > chosen[key][0]:
                chosen[key] = (area, path)
    return {key: path for key, (_, path) in sorted(chosen.items())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("debs", type=Path, nargs="+", help="the downloaded .deb files")
    p.add_argument("-o", "--output", type=Path, required=True)
    args = p.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        roots = [unpack(deb, Path(scratch)) for deb in args.debs]
        pictures = collect(roots)
        for key, path in pictures.items():
            with Image.open(path) as image:
                image = image.convert("RGB")
                image.thumbnail((MAX_SIDE, MAX_SIDE))
                target = args.output / f"{key}.jpg"
                partial = target.with_suffix(".part")
                image.save(partial, format="JPEG", quality=92)
                partial.replace(target)
    print(f"{args.output}: {len(pictures)} negative photos from {len(args.debs)} packages")


if __name__ == "__main__":
    main()
