"""Wall time and peak resident memory of one `mlaconvert convert` process, with the machine it ran on, as JSON.

    python docs/benchmarks/make_random_checkpoint.py --preset wan2.1-1.3b -o /tmp/wan13
    python docs/benchmarks/measure_convert.py /tmp/wan13 --preset-name wan2.1-1.3b -o docs/benchmarks/convert-wan2.1-1.3b-cpu.json \
        -- --init svd --no-measure --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("--preset-name", default=None, help="The shape the source has, for the record.")
    parser.add_argument("-o", "--output", type=Path, required=True)
    own, convert_args = (sys.argv[1:sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1 :]) if "--" in sys.argv else (sys.argv[1:], [])
    args = parser.parse_args(own)
    args.convert_args = convert_args
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "mlaconvert", "convert", args.source, "-o", f"{tmp}/export", *args.convert_args]
        tic = time.perf_counter()
        run = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - tic
        if run.returncode:
            print(run.stderr, file=sys.stderr)
            return run.returncode
        report = json.loads(Path(f"{tmp}/export/rank_report.json").read_text())
    size = sum(p.stat().st_size for p in Path(args.source).rglob("*.safetensors"))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    record = {
        "what": "mlaconvert convert " + " ".join(args.convert_args), "source_shape": args.preset_name,
        "checkpoint_bytes": size, "wall_seconds": round(wall, 1),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "stage_seconds": report["conversion"]["seconds"],
        "machine": {"cpu_cores": os.cpu_count(), "memory_bytes": memory, "platform": platform.platform()},
    }
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
