"""Rebuild the bundled tokenizer files in `src/sd3/assets/tokenizers/` from two PyPI archives.

SD3 needs CLIP's byte-level BPE (shared by CLIP-L and CLIP-G) and T5 v1.1's Unigram vocabulary.
Neither ships in a plain PyPI package in the form `tokenizers` loads, so this script derives
them from archives pinned by sha256:

- CLIP: `clip/bpe_simple_vocab_16e6.txt.gz` in the `clip-anytorch==2.6.0` wheel (OpenAI, MIT).
  The vocabulary is derived from the merges exactly as OpenAI's `simple_tokenizer.py` does and
  written as `vocab.json` + `merges.txt`, the files of a diffusers `tokenizer/` folder.
- T5: the `t5_tokenizer_json_str` C array in stable-diffusion.cpp's `vocab/clip_t5.hpp`, inside
  the `stable-diffusion-cpp-python==0.4.7` source archive (MIT; the vocabulary is Google's,
  Apache-2.0). The array holds the bytes of a Hugging Face `tokenizer.json`; it is decoded and
  re-serialised compactly.

Outputs are gzip-compressed (mtime 0, so reruns give identical bytes), and
`src/sd3/assets/PROVENANCE.md` records archive and file sha256 sums and the licences.

    python scripts/make_tokenizer_assets.py [--download-dir DIR]
"""

import argparse
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src" / "sd3" / "assets"
OUT = ASSETS / "tokenizers"

CLIP_PACKAGE = "clip-anytorch==2.6.0"
CLIP_ARCHIVE = "clip_anytorch-2.6.0-py3-none-any.whl"
CLIP_SHA256 = "ebc0afed243851b9dc7e16ab8afb665237e8a5838986e97cd99f123ae4ce94ce"
CLIP_MEMBER = "clip/bpe_simple_vocab_16e6.txt.gz"

SDCPP_PACKAGE = "stable-diffusion-cpp-python==0.4.7"
SDCPP_ARCHIVE = "stable_diffusion_cpp_python-0.4.7.tar.gz"
SDCPP_SHA256 = "998d1957260dd5ae4e18a8acc0c14b0a8757aaa9f96515197b6d5bbf46df9282"
SDCPP_MEMBER = (
    "stable_diffusion_cpp_python-0.4.7/vendor/stable-diffusion.cpp/src/tokenizers/vocab/clip_t5.hpp"
)
T5_ARRAY = "t5_tokenizer_json_str"

CLIP_VOCAB_SIZE = 49408


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download(
    requirement: str, filename: str, expected_sha256: str, dest: Path, sdist: bool
) -> bytes:
    path = dest / filename
    if not path.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), requirement]
        if sdist:
            cmd[4:4] = ["--no-binary", ":all:"]
        subprocess.run(cmd, check=True)
    data = path.read_bytes()
    if sha256(data) != expected_sha256:
        raise RuntimeError(f"{filename}: sha256 {sha256(data)} != pinned {expected_sha256}")
    return data


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character table (OpenAI `simple_tokenizer.py`)."""
    bs = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    cs = bs[:]
    # the remaining (unprintable) bytes map to code points 256, 257, ... in byte order
    unprintable = [b for b in range(256) if b not in bs]
    bs += unprintable
    cs += [256 + n for n in range(len(unprintable))]
    return dict(zip(bs, map(chr, cs), strict=True))


def clip_vocab_and_merges(bpe_gz: bytes) -> tuple[dict[str, int], list[str]]:
    """OpenAI's construction: 256 byte tokens, the same with '</w>', one token per merge, BOS, EOS."""
    lines = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # line 0 is a version header
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    tokens += ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"CLIP vocabulary has {len(vocab)} tokens, expected {CLIP_VOCAB_SIZE}")
    return vocab, merges


def c_array_bytes(source: bytes, name: str) -> bytes:
    """The bytes of `static const unsigned char NAME[] = {0x.., ...};` in a C source file."""
    start = source.index(f"{name}[] = {{".encode())
    end = source.index(b"};", start)
    body = source[start:end].split(b"{", 1)[1]
    return bytes(int(h, 16) for h in re.findall(rb"0x([0-9a-fA-F]{2})", body))


def gzip_bytes(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        f.write(data)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--download-dir", type=Path, help="where to keep the archives (default: temp)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        dest = args.download_dir or Path(tmp)
        dest.mkdir(parents=True, exist_ok=True)
        wheel = download(CLIP_PACKAGE, CLIP_ARCHIVE, CLIP_SHA256, dest, sdist=False)
        sdist = download(SDCPP_PACKAGE, SDCPP_ARCHIVE, SDCPP_SHA256, dest, sdist=True)

    with zipfile.ZipFile(io.BytesIO(wheel)) as z:
        bpe_gz = z.read(CLIP_MEMBER)
    vocab, merges = clip_vocab_and_merges(bpe_gz)
    vocab_json = json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode()
    merges_txt = ("#version: 0.2\n" + "\n".join(merges) + "\n").encode()

    with tarfile.open(fileobj=io.BytesIO(sdist), mode="r:gz") as t:
        hpp = t.extractfile(SDCPP_MEMBER).read()
    t5_raw = c_array_bytes(hpp, T5_ARRAY)
    t5 = json.loads(t5_raw)
    if t5["model"]["type"] != "Unigram" or len(t5["model"]["vocab"]) != 32100:
        raise RuntimeError("the embedded T5 tokenizer.json is not T5's 32100-piece Unigram model")
    t5_json = json.dumps(t5, ensure_ascii=False, separators=(",", ":")).encode()

    produced = {
        "clip/vocab.json.gz": vocab_json,
        "clip/merges.txt.gz": merges_txt,
        "t5/tokenizer.json.gz": t5_json,
    }
    rows = []
    for name, data in produced.items():
        packed = gzip_bytes(data)
        (OUT / name).parent.mkdir(parents=True, exist_ok=True)
        (OUT / name).write_bytes(packed)
        rows.append(
            f"| `tokenizers/{name}` | {len(packed):,} | `{sha256(packed)}` | `{sha256(data)}` |"
        )
        print(f"wrote {OUT / name} ({len(packed):,} bytes)")

    (ASSETS / "PROVENANCE.md").write_text(
        PROVENANCE.format(
            clip_sha=CLIP_SHA256,
            sdcpp_sha=SDCPP_SHA256,
            bpe_sha=sha256(bpe_gz),
            t5_raw_sha=sha256(t5_raw),
            rows="\n".join(rows),
        )
    )
    print(f"wrote {ASSETS / 'PROVENANCE.md'}")


PROVENANCE = """# Provenance of the bundled assets

Produced by `scripts/make_tokenizer_assets.py` from two PyPI archives (pinned by sha256, checked by
the script). Nothing is downloaded at run time. Rerunning the script reproduces these files byte
for byte.

## Sources

| archive (PyPI) | sha256 | member used | licence |
|---|---|---|---|
| `clip_anytorch-2.6.0-py3-none-any.whl` (`clip-anytorch==2.6.0`) | `{clip_sha}` | `clip/bpe_simple_vocab_16e6.txt.gz` (sha256 `{bpe_sha}`) | MIT, Copyright (c) 2021 OpenAI |
| `stable_diffusion_cpp_python-0.4.7.tar.gz` (`stable-diffusion-cpp-python==0.4.7`, sdist) | `{sdcpp_sha}` | C array `t5_tokenizer_json_str` in `vendor/stable-diffusion.cpp/src/tokenizers/vocab/clip_t5.hpp` (decoded bytes sha256 `{t5_raw_sha}`) | stable-diffusion.cpp: MIT, Copyright (c) 2023 leejet; the T5 v1.1 SentencePiece vocabulary itself: Apache-2.0, Google |

## Produced files

gzip-compressed (mtime 0); the last column is the sha256 of the decompressed content.

| file | bytes | sha256 (gz) | sha256 (content) |
|---|---|---|---|
{rows}

- `clip/vocab.json`, `clip/merges.txt`: CLIP's byte-level BPE (used by CLIP-L and CLIP-G), in the
  format of a diffusers `tokenizer/` folder. The vocabulary is derived from OpenAI's merges the way
  OpenAI's `simple_tokenizer.py` does: 256 byte tokens, the same with `</w>`, one token per merge
  (48,894), then `<|startoftext|>` (49406) and `<|endoftext|>` (49407).
- `t5/tokenizer.json`: the Hugging Face `tokenizers` file of T5 v1.1 (Unigram, 32,100 pieces
  including 100 `<extra_id_*>` sentinels), re-serialised without indentation.
"""


if __name__ == "__main__":
    main()
