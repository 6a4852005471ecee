"""The baseline of the service-overhead case: the same ``aoti_compile_and_package`` call the
worker's build child makes, run directly in one process.

    python -m bench.direct_build PROGRAM.pt2 OUT.pt2     # prints JSON timings
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    program_path, out = sys.argv[1], sys.argv[2]
    t0 = time.perf_counter()
    import torch
    from torch._inductor import aoti_compile_and_package

    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    program = torch.export.load(program_path)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    # The options the aoti backend passes for a request with default options.
    aoti_compile_and_package(program, package_path=out,
                             inductor_configs={"max_autotune": False})
    build_s = time.perf_counter() - t0
    print(json.dumps({"import_s": import_s, "load_s": load_s, "build_s": build_s}))


if __name__ == "__main__":
    main()
