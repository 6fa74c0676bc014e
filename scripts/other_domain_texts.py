"""Texts of other domains, from Debian's registry (reachable where no dataset hub is), both in the public domain.

    python scripts/other_domain_texts.py                       # spinquant/texts/devils_dictionary/eval.txt
    python scripts/other_domain_texts.py --mix /tmp/mix.txt    # and a calibration text: WikiText's calib.txt + the Jargon File

- Ambrose Bierce's The Devil's Dictionary (1911; `dict-devil`): satirical definitions and verse a century older than
  WikiText's encyclopedia articles, to measure on only.
- The Jargon File 4.4.7 (2003; `dict-jargon`): hackers' slang, its first 415 kB interleaved with WikiText's calib.txt
  in chunks of about 4 kB (so that GPTQ's first windows see both), to calibrate on a mix of domains.

Each is its dictd file without dictfmt's `00-database-*` headwords and the character line closing the file.
"""

import argparse
import gzip
import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

from spinquant.data import OUT_OF_DOMAIN_TEXT, calibration_text

CHUNK = 4000  # characters per interleaved chunk: about GPTQ's windows of 1,024 tokens


def dictd_text(package: str, first_line: str, scratch: Path) -> tuple[str, str]:
    """The package's text from the line starting with `first_line`, and the .deb's name."""
    subprocess.run(["apt-get", "download", package], cwd=scratch, check=True, capture_output=True)
    deb = next(scratch.glob(f"{package}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(scratch / package)], check=True)
    (dz,) = (scratch / package / "usr/share/dictd").glob("*.dict.dz")
    lines = gzip.decompress(dz.read_bytes()).decode("utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(first_line))
    end = max(i for i, line in enumerate(lines) if "abcdefghijklmnopqrstuvwxyz" in line)  # dictfmt's alphabet line
    return "\n".join(lines[start:end]).strip() + "\n", deb.name


def chunks(text: str, separator: str) -> list[str]:
    out, current = [], ""
    for paragraph in text.split(separator):
        current += paragraph + separator
        if len(current) >= CHUNK:
            out.append(current)
            current = ""
    return out + [current] if current.strip() else out


def interleaved(first: list[str], second: list[str]) -> str:
    return "".join(c for i in range(max(len(first), len(second))) for c in (first[i:i + 1] + second[i:i + 1]))


def write(path: Path, text: str, source: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    data = text.encode()
    print(f"{path}: {source}, {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}", file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mix", type=Path, help="also write WikiText's calib.txt interleaved with the Jargon File here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        devil, deb = dictd_text("dict-devil", "The Internet Wiretap 1st Online Edition of", Path(tmp))
        write(OUT_OF_DOMAIN_TEXT, devil, deb)
        if args.mix:
            jargon, deb = dictd_text("dict-jargon", "This document (the Jargon File) is in the public domain", Path(tmp))
            wiki = calibration_text().read_text(encoding="utf-8")
            part = jargon[: jargon.rfind("\n\n", 0, len(wiki.encode()))].strip() + "\n"  # about as long as calib.txt
            write(args.mix, interleaved(chunks(wiki, "\n"), chunks(part, "\n\n")), f"{calibration_text().name} + {deb}")


if __name__ == "__main__":
    main()
