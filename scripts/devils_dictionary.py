"""Make spinquant/texts/devils_dictionary/eval.txt from Debian's `dict-devil` package: text of another domain.

    python scripts/devils_dictionary.py

Ambrose Bierce's The Devil's Dictionary (1911; public domain, its copyright expired, as the package's copyright file
says): satirical definitions and verse a century older than WikiText's encyclopedia articles. The package is
downloaded with `apt-get download` (Debian's registry is reachable where no dataset hub is); the text is its dictd
file without dictfmt's `00-database-*` headwords and the alphabet line closing the file.
"""

import gzip
import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE = "dict-devil"
OUT = Path(__file__).resolve().parent.parent / "spinquant" / "texts" / "devils_dictionary" / "eval.txt"


def dictd_text(deb: Path, scratch: Path) -> str:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(scratch)], check=True)
    raw = gzip.decompress((scratch / "usr/share/dictd/devil.dict.dz").read_bytes()).decode("utf-8")
    lines = raw.splitlines()
    start = next(i for i, line in enumerate(lines) if "The Internet Wiretap 1st Online Edition of" in line)
    end = max(i for i, line in enumerate(lines) if line.strip() == "abcdefghijklmnopqrstuvwxyz")
    return "\n".join(lines[start:end]).strip() + "\n"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, check=True, capture_output=True)
        deb = next(Path(tmp).glob(f"{PACKAGE}_*.deb"))
        text = dictd_text(deb, Path(tmp) / "x")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"{OUT}: {deb.name}, {len(text.encode())} bytes, sha256 {hashlib.sha256(text.encode()).hexdigest()}", file=sys.stderr)


if __name__ == "__main__":
    main()
