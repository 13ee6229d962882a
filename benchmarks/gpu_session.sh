#!/usr/bin/env bash
# One GPU-machine session: the GPU tests and the benchmarks, logs and JSON under $OUT (default ./gpu-out).
#   bash benchmarks/gpu_session.sh tests kernels j8 j8sync j8pen scoring j8ref j8cublas j8nomerge j8both j8xla j8fp8 j8fp8nocb j1 l8 l8q l8fused \
#        l8qxla l8xla l8dump vmm j8vmm l8vmm profile profile1 profile_b1 profile_prefill profile_tp2 layers2 graphupd ppupd ppasync startup compare_hf qmm qmmsweep qmmengine qmmbitcvt qmmbundled attnsweep memj1 mesh8 mesh70 launchsplit kvlayout tpflags tpenv mp mp8 \
#        moe moe30 moe30ep mixtral
# (any subset, run in the order given; mesh8, profile_tp2, graphupd, ppupd and ppasync need 2+ GPUs, layers2 4 at its
# default TP_SIZES; mesh8 runs the Llama-3.1-8B shape at TP 1 and 2 by default, MESHES=...; mesh70 the Llama-3.1-70B shape, 4x1x1 by default, MESHES70=...; both once per MESH_VARIANTS entry;
# moe30 / mixtral: J8's lengths on the Qwen3-30B-A3B shape (MESHES_MOE, default 1x1x1) / Mixtral-8x7B (MESHES_MIXTRAL, 2x1x1);
# moe30ep: the Qwen3-30B-A3B shape at MESHES_EP (default 2x1x1) with split experts, then whole ones (--enable-expert-parallel),
# e.g. MESH_VARIANTS="XLA_FLAGS=;XLA_FLAGS=--xla_gpu_enable_command_buffer=+COLLECTIVES" for an A/B on one lease;
# a sweep split over calls: MESH_ARGS="--process-per-mesh --scaling-base-log FILE", FILE an earlier call's log carried in the tree)
# Run from the repository root; JAXLLM_COMMIT names the commit when the tree is not a git checkout. Wheels of
# packages the machine lacks (gguf: `pip download --no-deps -d .whl gguf==0.19.0`, carried as `.whl`) are installed
# into /tmp/site first.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export NCCL_NVLS_ENABLE=0  # NVLink multicast off: it can take the host's shared GPUs out of service
XLA_DEFAULTS='{"xla_gpu_enable_triton_gemm": true, "xla_disable_hlo_passes": ""}'  # XLA's own, not jaxllm's
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 JAXLLM_CACHE_DIR=${JAXLLM_CACHE_DIR:-/tmp/jaxllm-xla}
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv | tee "$OUT/gpu.txt"
small_tp_job() {  # the Llama-3.1-8B shape on a small job (MESHES, default TP 4; SMALL_TP_ARGS: more mesh_scaling options,
  # e.g. --no-async-scheduling); mp runs the same job one process per GPU
  python3 benchmarks/mesh_scaling.py --model benchmarks/configs/llama-3.1-8b --meshes ${MESHES:-4x1x1} \
    --num-prompts 32 --input-len 128 --output-len 64 --max-num-seqs 32 --max-num-batched-tokens 512 ${SMALL_TP_ARGS:-} 2>&1 \
    | tee -a "$OUT/small_tp_job.log"
}
small_tp_rows() { small_tp_job | grep -E "^ +[0-9]+x|Error"; }  # small_tp_job's table rows only
graph_updates() {  # LOG ARGS...: profile_step on J8's engine with ARGS; prints decode step, graph updates / executes
  # per step and the untraced step times (the full output goes to $OUT/LOG)
  local log=$1; shift
  python3 benchmarks/profile_step.py --job J8 "$@" 2>&1 | tee -a "$OUT/$log" \
    | grep -E "decode step|command_buffer::(update|execute)|^JSON" \
    | sed -E 's/^JSON .*"untraced_step_ms": (\[[^]]*\]).*/  untraced step ms \1/'
}
with_variants() {  # LIST CMD...: CMD once per ';'-separated variant of LIST, each a set of shell assignments (e.g.
  # JAXLLM_MESH_LAUNCH_THREAD=1 XLA_FLAGS='--a --b') exported in a subshell of its own; an empty LIST runs CMD once as is
  local list=$1; shift
  if [ -z "$list" ]; then "$@"; return; fi
  local variants v
  IFS=';' read -ra variants <<< "$list;"  # the extra ";" keeps a trailing empty variant (read drops one)
  for v in "${variants[@]}"; do ( eval "export $v"; echo "variant: $v"; "$@" ); done
}
graph_updates_per_tp() {  # graph_updates on J8's engine, batch-1 decode, at each TP of TP_SIZES (default 2)
  local tp
  for tp in ${TP_SIZES:-2}; do
    echo "TP $tp"; graph_updates graphupd.log --tensor-parallel-size $tp --num-prompts 1 --out /tmp/graphupd-trace
  done
}
pipeline_updates_and_j8() {  # J8's engine at PP 2 (two microbatches in flight): graph updates per step, then J8 itself
  graph_updates ppupd.log --pipeline-parallel-size 2 --num-prompts ${PPUPD_PROMPTS:-64} --out /tmp/ppupd-trace
  python3 benchmarks/mesh_scaling.py --job J8 --meshes 1x2x1 2>&1 | tee -a "$OUT/ppupd.log" | grep -Ev "^JSON|^ROW"
}
mesh_job() {  # LOG ARGS...: mesh_scaling on J8 with ARGS and MESH_ARGS, rows appended to $OUT/LOG
  local log=$1; shift
  python3 benchmarks/mesh_scaling.py --job J8 "$@" ${MESH_ARGS:-} 2>&1 | tee -a "$OUT/$log" | grep -Ev "^JSON"
}
for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    tests) python3 -m pytest -m gpu -q -s tests 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "gpu parity|passed|failed|Error" ;;
    memj1) python3 benchmarks/memory_report.py --job J1 --gpu-memory-utilization ${J1_GPU_MEMORY_UTILIZATION:-0.9} 2>&1 | tee "$OUT/memory_j1.log" | grep -Ev "^JSON" ;;
    attnsweep) python3 benchmarks/kernels.py --sweep "${ATTN_SWEEP-prefill}" --sweep-only --json "$OUT/attn_sweep.json" 2>&1 | tee "$OUT/attn_sweep.log" | grep -Ev "^JSON" ;;
    kernels) python3 benchmarks/kernels.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log" ;;
    j8) python3 benchmarks/throughput.py --job J8 --record 2>&1 | tee "$OUT/j8.log" | grep -Ev "^\{" ;;
    j8sync) python3 benchmarks/throughput.py --job J8 --no-async-scheduling --record 2>&1 | tee "$OUT/j8sync.log" | grep -Ev "^\{" ;;
    j8pen) for a in --no-async-scheduling ""; do  # J8 with repetition_penalty=1.1: one step at a time, then scheduled ahead
             python3 benchmarks/throughput.py --job J8 --repetition-penalty 1.1 $a --record 2>&1 | tee -a "$OUT/j8pen.log" | grep -Ev "^\{"; done ;;
    scoring) for plp in "" "--prompt-logprobs ${PROMPT_LOGPROBS:-5}"; do  # J8's prompts, 1 output token: without, then with prompt logprobs
               python3 benchmarks/throughput.py --job J8 --output-len 1 $plp --record 2>&1 | tee -a "$OUT/scoring.log" | grep -Ev "^\{"; done ;;
    j8fp8nocb) XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" python3 benchmarks/throughput.py --job J8 --quantization fp8 \
                 --kv-cache-dtype fp8 --record 2>&1 | tee "$OUT/j8fp8nocb.log" | grep -Ev "^\{" ;;  # is XLA's ~4.7 ms graph launch per step the host bound?
    j8cublas) XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" python3 benchmarks/throughput.py --job J8 2>&1 | tee "$OUT/j8cublas.log" | grep -Ev "^\{" ;;
    j8nomerge) XLA_FLAGS="${XLA_FLAGS:-} --xla_disable_hlo_passes=dot-merger" python3 benchmarks/throughput.py --job J8 2>&1 | tee "$OUT/j8nomerge.log" | grep -Ev "^\{" ;;
    j8both) XLA_FLAGS="${XLA_FLAGS:-} --xla_disable_hlo_passes=dot-merger --xla_gpu_enable_triton_gemm=false" python3 benchmarks/throughput.py --job J8 2>&1 | tee "$OUT/j8both.log" | grep -Ev "^\{" ;;
    vmm) python3 -m pytest -m gpu -q -s tests/gpu/test_device_memory_gpu.py 2>&1 | tee "$OUT/vmm_test.log" | grep -E "cuda driver|passed|failed|rror" ;;
    j8vmm) XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_command_buffer_update_mode=SKIP_TEMP" python3 benchmarks/throughput.py \
             --job J8 --record 2>&1 | tee "$OUT/j8vmm.log" | grep -Ev "^\{" ;;  # XLA's VMM allocator, cache sized by the driver
    l8vmm) XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_command_buffer_update_mode=SKIP_TEMP" python3 benchmarks/latency.py \
             --record 2>&1 | tee "$OUT/l8vmm.log" | grep -Ev "^JSON" ;;
    j8xla) python3 benchmarks/throughput.py --job J8 --xla-compiler-options "$XLA_DEFAULTS" --record 2>&1 | tee "$OUT/j8xla.log" | grep -Ev "^\{" ;;
    j8fp8) python3 benchmarks/throughput.py --job J8 --quantization fp8 --kv-cache-dtype fp8 --record 2>&1 | tee "$OUT/j8fp8.log" | grep -Ev "^\{"
           python3 benchmarks/throughput.py --job J8 --kv-cache-dtype fp8 --record 2>&1 | tee "$OUT/j8fp8kv.log" | grep -Ev "^\{" ;;
    profile_b1) for q in ${B1_METHODS:-bf16 int8}; do  # batch-1 decode step, unquantized and quantized
                  python3 benchmarks/profile_step.py --job J8 --num-prompts 1 --out /tmp/b1-$q-trace \
                    $([ $q = bf16 ] || echo --quantization $q) 2>&1 | tee "$OUT/profile_b1_$q.log" | grep -Ev "^JSON"
                done ;;
    l8xla) python3 benchmarks/latency.py --batch-sizes 1 --xla-compiler-options "$XLA_DEFAULTS" 2>&1 | tee "$OUT/l8_xla.log" | grep -Ev "^JSON"
           python3 benchmarks/latency.py --batch-sizes 1 --xla-compiler-options '{"xla_gpu_enable_triton_gemm": true}' 2>&1 | tee "$OUT/l8_triton.log" | grep -Ev "^JSON" ;;
    layers2) cfg=/tmp/jaxllm-llama-3.1-8b-2-layers; mkdir -p $cfg  # a batch-1 step of the 8B shape with 2 layers (quick to
             # compile, the same per-layer ops) per TP of TP_SIZES: device ops and the forward program's host work per layer
             python3 -c "import json; c = json.load(open('benchmarks/configs/llama-3.1-8b/config.json')); c['num_hidden_layers'] = 2; json.dump(c, open('$cfg/config.json', 'w'))"
             for tp in ${TP_SIZES:-1 2 4}; do
               python3 benchmarks/profile_step.py --job J8 --model $cfg --num-prompts 1 --tensor-parallel-size $tp \
                 --out /tmp/layers2-tp$tp-trace 2>&1 | tee "$OUT/layers2_tp$tp.log" | grep -Ev "^JSON"
               cp "$(find /tmp/layers2-tp$tp-trace -name "*.trace.json.gz" | tail -1)" "$OUT/layers2_tp$tp.trace.json.gz"
             done ;;
    profile_tp2) n=${PROFILE_PROMPTS:-1}  # decode steps of n requests (1: batch 1; 256: J8's) per tensor-parallel size, traces kept
                 for tp in ${TP_SIZES:-2 1}; do
                   python3 benchmarks/profile_step.py --job J8 --tensor-parallel-size $tp --num-prompts $n --out /tmp/tp$tp-trace 2>&1 \
                     | tee "$OUT/profile_tp${tp}_b$n.log" | grep -Ev "^JSON"
                   cp "$(find /tmp/tp$tp-trace -name "*.trace.json.gz" | tail -1)" "$OUT/tp${tp}_b$n.trace.json.gz"
                 done ;;
    graphupd) with_variants "${GRAPHUPD_VARIANTS:-JAXLLM_STABLE_STEP_OUTPUTS=0;JAXLLM_STABLE_STEP_OUTPUTS=1}" graph_updates_per_tp ;;
    ppasync) for a in --no-async-scheduling ""; do  # pipelines one step at a time, then scheduled ahead (MESHES, default PP 2)
               mesh_job ppasync.log --meshes ${MESHES:-1x2x1} $a; done ;;
    ppupd) with_variants "${PPUPD_VARIANTS:-JAXLLM_STABLE_STAGE_OUTPUTS=0;JAXLLM_STABLE_STAGE_OUTPUTS=1}" pipeline_updates_and_j8 ;;
    profile_prefill) python3 benchmarks/profile_step.py --job J8 --phase prefill --out /tmp/j8-prefill-trace 2>&1 | tee "$OUT/profile_prefill.log" | grep -Ev "^JSON" ;;
    j8ref) python3 benchmarks/throughput.py --job J8 --attention-impl reference --record 2>&1 | tee "$OUT/j8ref.log" | grep -Ev "^\{" ;;
    j1) python3 benchmarks/throughput.py --job J1 --gpu-memory-utilization ${J1_GPU_MEMORY_UTILIZATION:-0.8} --record 2>&1 | tee "$OUT/j1.log" | grep -Ev "^\{" ;;
    l8) python3 benchmarks/latency.py --record 2>&1 | tee "$OUT/l8.log" | grep -Ev "^JSON" ;;
    l8q) for q in ${L8Q_METHODS:-int8 int4}; do
           python3 benchmarks/latency.py --quantization $q --batch-sizes 1 ${L8Q_ARGS:-} --record 2>&1 | tee "$OUT/l8_$q${L8Q_ARGS:+_extra}.log" | grep -Ev "^JSON"
         done ;;
    l8dump) for q in ${L8DUMP_METHODS:-int8}; do  # L8 batch 1 compiled afresh with XLA's HLO dumped: counts of Triton fusion kinds, cuBLAS calls and Pallas calls per program
              rm -rf /tmp/xla-dump-$q
              JAXLLM_CACHE_DIR= XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=/tmp/xla-dump-$q --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*forward.*" \
                python3 benchmarks/latency.py --quantization $q --batch-sizes 1 2>&1 | tee "$OUT/l8_dump_$q.log" | grep -E "ITL|rror"
              for f in /tmp/xla-dump-$q/*after_optimizations.txt; do
                echo "$(basename $f): $(grep -oE '"kind":"__triton[a-z_]*"|__cublas[$a-z]*|__gpu\$xla\.gpu\.triton' $f | sort | uniq -c | xargs)"
              done | tee "$OUT/l8_dump_$q.txt"
              tar -czf "$OUT/l8_dump_$q.tar.gz" -C /tmp/xla-dump-$q $(cd /tmp/xla-dump-$q && ls *after_optimizations.txt)  # the HLO itself comes back
            done ;;
    l8fused) for q in ${L8FUSED_METHODS:-int4 fp8}; do  # q/k/v and gate/up as one Pallas launch each (JAXLLM_FUSED_PROJECTIONS), off then on
              for f in 0 1; do
                JAXLLM_FUSED_PROJECTIONS=$f python3 benchmarks/latency.py --quantization $q --batch-sizes 1 2>&1 | tee "$OUT/l8_${q}_fused$f.log" | grep -E "batch 1|rror"
              done
            done ;;
    l8qxla) for q in ${L8Q_METHODS:-int8 int4}; do  # the same with XLA's own GPU options (Triton GEMM, dot merger)
           python3 benchmarks/latency.py --quantization $q --batch-sizes 1 --xla-compiler-options "$XLA_DEFAULTS" 2>&1 | tee "$OUT/l8_${q}_xla.log" | grep -Ev "^JSON"
         done ;;
    profile) python3 benchmarks/profile_step.py --job J8 --out /tmp/j8-trace 2>&1 | tee "$OUT/profile.log" | grep -Ev "^JSON"
             cp "$(find /tmp/j8-trace -name "*.trace.json.gz" | tail -1)" "$OUT/j8_decode.trace.json.gz" ;;
    profile1) python3 benchmarks/profile_step.py --job J1 --out /tmp/j1-trace 2>&1 | tee "$OUT/profile_j1.log" | grep -Ev "^JSON" ;;
    mesh8) with_variants "${MESH_VARIANTS:-}" mesh_job mesh8.log --meshes ${MESHES:-1x1x1,2x1x1} ;;  # MESH_VARIANTS: A/B on one lease
    launchsplit) for tp in ${TP_SIZES:-4 2}; do for layers in ${SPLIT_LAYERS:-32 8}; do  # batch-1 launch split, each a process
                   python3 benchmarks/launch_split.py --tensor-parallel-size $tp --num-layers $layers 2>&1 \
                     | tee -a "$OUT/launch_split.log" | grep -Ev "^JSON"; done; done ;;
    kvlayout) for round in 1 2; do for limit in ${KV_LIMITS:-0 1099511627776}; do  # JAXLLM_KV_ARRAY_MAX_BYTES A/B,
                # batch 1 at TP KV_TP (default 4), 32 layers, each value a process, alternating; by default the
                # per-layer layout against one array per stage (no cost on one GPU since session 38's remat fix);
                # KV_ARGS: more launch_split options, e.g. --gpu-memory-utilization 0.3 (a small cache)
                JAXLLM_KV_ARRAY_MAX_BYTES=$limit python3 benchmarks/launch_split.py --tensor-parallel-size ${KV_TP:-4} \
                  --num-layers 32 ${KV_ARGS:-} 2>&1 | tee -a "$OUT/kvlayout.log" | grep -E "batch-1 ITL|KV cache|^  (launch|stage_call) |rror" \
                  | sed "s/^/[round $round, max bytes $limit] /"; done; done ;;
    tpflags) IFS=';' read -ra variants <<< "${TPFLAGS_VARIANTS:-};"  # batch-1 latency on a small job per XLA_FLAGS variant
             for v in "${variants[@]:-}"; do XLA_FLAGS="$v" small_tp_job | grep -E "^ +[0-9]+x|^variant|Error"; done ;;
    tpenv) with_variants "${TPENV_VARIANTS:-JAXLLM_MESH_LAUNCH_THREAD=0;JAXLLM_MESH_LAUNCH_THREAD=1}" small_tp_rows ;;
    mp) python3 benchmarks/multiprocess_mesh.py --num-processes ${MP_PROCS:-4} --model benchmarks/configs/llama-3.1-8b \
          --num-prompts 32 --input-len 128 --output-len 64 --max-num-seqs 32 --max-num-batched-tokens 512 \
          2>&1 | tee -a "$OUT/mp.log" | grep -Ev "^JSON" ;;  # small_tp_job's job, one process per GPU
    mp8) python3 benchmarks/multiprocess_mesh.py --num-processes ${MP_PROCS:-4} --job J8 2>&1 | tee "$OUT/mp8.log" | grep -Ev "^JSON" ;;
    mesh70) with_variants "${MESH_VARIANTS:-}" mesh_job mesh70.log --model benchmarks/configs/llama-3.1-70b --meshes ${MESHES70:-4x1x1} ;;
    moe) python3 benchmarks/moe_experts.py 2>&1 | tee "$OUT/moe.log" ;;  # one MoE layer's grouped expert matmuls
    moe30) mesh_job moe30.log --model benchmarks/configs/qwen3-30b-a3b --meshes ${MESHES_MOE:-1x1x1} ;;  # J8 lengths
    moe30ep) for ep in "" --enable-expert-parallel; do  # each mesh in a process of its own: MESH_ARGS=--process-per-mesh
               mesh_job moe30ep.log --model benchmarks/configs/qwen3-30b-a3b --meshes ${MESHES_EP:-2x1x1} $ep; done ;;
    mixtral) mesh_job mixtral.log --model benchmarks/configs/mixtral-8x7b --meshes ${MESHES_MIXTRAL:-2x1x1} ;;
    startup) python3 benchmarks/startup.py --job J8 --record 2>&1 | tee "$OUT/startup.log" | grep -Ev "^JSON" ;;
    compare_hf) python3 benchmarks/compare_hf.py --job J8 --record 2>&1 | tee "$OUT/compare_hf.log" | grep -Ev "^JSON" ;;
    qmm) python3 benchmarks/quantized_matmul.py --rows ${QMM_ROWS:-1,16,64,256} --json "$OUT/qmm.json" 2>&1 | tee "$OUT/qmm.log" ;;
    qmmengine) python3 benchmarks/quantized_matmul.py --methods ${QMM_METHODS:-int8,int4,fp8} --impls pallas_gpu,xla --engine-xla-options \
                --rows ${QMM_ROWS:-16,64,256,4096} --shapes 4096x6144,4096x14336,14336x4096 --json "$OUT/qmm_engine.json" 2>&1 | tee "$OUT/qmm_engine.log" | grep -Ev "^JSON" ;;
    qmmbitcvt) python3 benchmarks/quantized_matmul.py --methods int4 --impls pallas_gpu,xla --int4-bit-convert --engine-xla-options \
                --rows ${QMM_ROWS:-1,16,64,128} --shapes 4096x6144,4096x14336,14336x4096 --json "$OUT/qmm_bitcvt.json" 2>&1 | tee "$OUT/qmm_bitcvt.log" | grep -Ev "^JSON" ;;
    qmmbundled) python3 benchmarks/quantized_matmul.py --methods int8 --impls pallas_gpu,xla,bundled_mgpu --rows 16,256,4096 \
                --shapes 4096x14336,14336x4096 --json "$OUT/qmm_bundled.json" 2>&1 | tee "$OUT/qmm_bundled.log" | grep -Ev "^JSON" ;;
    qmmsweep) python3 benchmarks/quantized_matmul.py --sweep --rows ${SWEEP_ROWS:-1} --methods ${SWEEP_METHODS:-int8,int4} --impls pallas_gpu \
                --shapes 4096x4096,4096x14336,14336x4096 --json "$OUT/qmm_sweep.json" 2>&1 | tee "$OUT/qmm_sweep.log" | grep -Ev "^JSON" ;;
    *) echo "unknown stage $stage" ;;
  esac
done
cp benchmarks/RESULTS.md "$OUT/RESULTS.md" 2>/dev/null || true
