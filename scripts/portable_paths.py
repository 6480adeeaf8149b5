"""Rewrite result files so they hold no machine's absolute paths (numbers untouched: text is replaced, not
re-serialised).

    python scripts/portable_paths.py --checkout /abs/path/of/checkout --data-dir /abs/path/of/data bench/results

A path inside the checkout's virtual environment becomes ``<site-packages>/...``, one inside the data folder
``$LORAPRUNE_DATA_DIR/...``, one inside the checkout its path relative to the checkout, and a temporary
folder ``<tmp>/...``. The same forms the library now records (``loraprune_trainer.data.portable_path``).
"""

from __future__ import annotations

import argparse
import os
import re


def rewrite(text: str, checkout: str, data_dir: str | None) -> str:
    checkout = checkout.rstrip("/")
    text = re.sub(re.escape(checkout) + r"/\.venv/lib/python[0-9.]+/site-packages", "<site-packages>", text)
    if data_dir:
        text = text.replace(data_dir.rstrip("/") + "/", "$LORAPRUNE_DATA_DIR/")
        text = text.replace(data_dir.rstrip("/"), "$LORAPRUNE_DATA_DIR")
    text = text.replace(checkout + "/", "")
    text = re.sub(re.escape(checkout) + r'(?=["\s,])', ".", text)
    return re.sub(r"(?:\.\./)*(?:\.\.)?/tmp/tmp[A-Za-z0-9_]+", "<tmp>", text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkout", required=True, help="Absolute path of the checkout the results were made in.")
    p.add_argument("--data-dir", default=None, help="Absolute path of the data folder they read.")
    p.add_argument("paths", nargs="+", help="Files or folders (every .json and .md below them).")
    args = p.parse_args(argv)
    files = []
    for path in args.paths:
        if os.path.isdir(path):
            files += [os.path.join(d, f) for d, _, names in os.walk(path) for f in names if f.endswith((".json", ".md"))]
        else:
            files.append(path)
    changed = 0
    for path in sorted(files):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new = rewrite(text, args.checkout, args.data_dir)
        if new != text:
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(new)
            os.replace(tmp, path)
            changed += 1
    print(f"{changed} of {len(files)} files rewritten")


if __name__ == "__main__":
    main()
