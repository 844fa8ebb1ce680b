#!/usr/bin/env bash
# Every GPU check in one run, for a lent GPU machine (python3 with torch and transformers, no network):
# the CUDA parity and CUDA-graph tests, then benchmarks/bench_cuda.py (eager vs graphed engine decode, batch 1
# and 8; with WITH_COMPILE=1 also torch.compile'd). About 7 minutes (12 with compile). Logs go to $OUT (or
# ./cuda-check).
#     bash benchmarks/cuda_check.sh
set -o pipefail
out=${OUT:-cuda-check}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/tests.log"
# What `gemma4 serve` runs on: the LLM's engine, graphed by default on a GPU
timeout 60 python3 -c "
import gemma4
llm = gemma4.LLM(None, device='cuda', kv_memory=1 << 30)
llm.generate([[2, 651, 6037]] * 3, max_new_tokens=8, temperature=0)
w = llm.engine.worker
print('LLM on CUDA: graphed', w.graphed, 'graphs captured', sorted(w.graphs))
assert w.graphed and w.graphs
" 2>&1 | tee "$out/serve.log"
timeout 150 python3 benchmarks/bench_cuda.py --skip-reference --steps 32 2>&1 | tee "$out/bench.log"
if [ -n "$WITH_COMPILE" ]; then
    timeout 200 python3 benchmarks/bench_cuda.py --skip-reference --steps 32 --compile 2>&1 | tee "$out/bench_compile.log"
fi
