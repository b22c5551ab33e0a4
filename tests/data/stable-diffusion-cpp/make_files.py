"""Writes this folder's GGUF files with stable-diffusion.cpp's own converter, so the tests read
files as that program writes them, not as we think it does. Needs the benchmark extra
(`pip install -e .[bench]`); the tests need only the files.

    python tests/data/stable-diffusion-cpp/make_files.py

The source is `helpers.sdcpp_source()` (seeded random weights, rebuilt by the tests to compare
against) in Stability's single-file layout, as float16; converted once as Q4_0 throughout and
once with mixed types per tensor pattern (a K-quant among them).
"""

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/, for helpers

import torch  # noqa: E402
from helpers import save_single_file, sdcpp_source  # noqa: E402
from stable_diffusion_cpp import stable_diffusion_cpp as sd_cpp  # noqa: E402
from stable_diffusion_cpp.stable_diffusion import GGML_TYPE_MAP  # noqa: E402

FILES = {
    "sd35_q4_0.gguf": ("q4_0", ""),
    "sd35_mixed.gguf": (
        "q8_0",
        r"joint_blocks\.1\.=q4_K,joint_blocks\.0\.context_block\.=q5_1,"
        r"^text_encoders\.clip_l\.=q4_1,^text_encoders\.t5xxl\.=q5_0",  # types as it spells them
    ),
}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source = save_single_file(Path(tmp) / "source.safetensors", sdcpp_source(), torch.float16)
        for name, (wtype, rules) in FILES.items():
            ok = sd_cpp.convert(str(source).encode(), b"", str(HERE / name).encode(),
                                int(GGML_TYPE_MAP[wtype]), rules.encode(), True)  # fmt: skip
            if not ok:
                raise SystemExit(f"stable-diffusion.cpp could not convert {name}")
            print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
