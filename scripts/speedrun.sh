#!/usr/bin/env bash
# The main job: from nothing to a DeepSeek-V3-architecture model (MLA + DeepSeekMoE + MTP) that reasons in the
# R1 chat format, on a 2-core CPU: tokenizer, pretraining, SFT and evaluation in under 30 minutes, then the R1
# stages (GRPO on verifier rewards, rejection sampling + distillation into a small dense student) within 60.
#   bash scripts/speedrun.sh --no-r1    # stop after SFT and its evaluation
#   bash scripts/speedrun.sh            # the full run (recipes/speedrun_cpu.toml)
#   bash scripts/speedrun.sh --smoke    # a few-minute smoke run of the same pipeline (what CI runs)
#   bash scripts/speedrun.sh key=value  # recipe overrides, e.g. run.name=mine pretrain.steps=800
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE=${RECIPE:-recipes/speedrun_cpu.toml}
OVERRIDES=()
EVAL_PROBLEMS=500
R1=1
for arg in "$@"; do
    if [ "$arg" = "--smoke" ]; then
        # Every stage runs, on a few problems: the in-training evaluator included. A smoke teacher trained for
        # seconds solves nothing, so distillation reads recorded traces instead (3 in 4 correct): rejection
        # sampling must drop the wrong ones.
        OVERRIDES+=(run.name=speedrun_smoke pretrain.steps=12 sft.steps=6 data.train_problems=600
                    data.val_problems=20 train.save_every=0 eval.problems=4 eval.max_tokens=24
                    tokenizer.train_docs=800)
        OVERRIDES+=(grpo.steps=2 grpo.prompts_per_step=2 grpo.group_size=2 grpo.max_completion_tokens=24
                    grpo.save_every=0 distill.teacher=recipes/smoke_teacher_traces.jsonl distill.steps=3
                    distill.max_tokens=24 distill.eval_problems=6)
        EVAL_PROBLEMS=20
    elif [ "$arg" = "--no-r1" ]; then
        R1=0
    else
        OVERRIDES+=("$arg")
    fi
done
start=$(date +%s)
stamp() { date +%s; }
bash scripts/setup.sh
NS=.venv/bin/nanoseek
RUN=$(.venv/bin/python -c "import sys; from nanoseek.train.recipe import load_recipe, run_dir; print(run_dir(load_recipe(sys.argv[1], sys.argv[2:])))" "$RECIPE" "${OVERRIDES[@]}")
LEVELS=$(.venv/bin/python -c "import sys; from nanoseek.train.recipe import load_recipe; r = load_recipe(sys.argv[1], sys.argv[2:]); print(','.join(map(str, r['data']['levels'])))" "$RECIPE" "${OVERRIDES[@]}")
mkdir -p "$RUN"
t_setup=$(stamp)
$NS train tokenizer --recipe "$RECIPE" "${OVERRIDES[@]}"
t_tok=$(stamp)
$NS train pretrain --recipe "$RECIPE" "${OVERRIDES[@]}"
t_pre=$(stamp)
$NS train sft --recipe "$RECIPE" "${OVERRIDES[@]}"
t_sft=$(stamp)
$NS eval --model "$RUN/sft/model" --task arithmetic --levels "$LEVELS" --problems "$EVAL_PROBLEMS" \
    --max-tokens 256 --out "$RUN/eval_sft.json"
t_eval=$(stamp)
t_grpo=$t_eval t_eval_grpo=$t_eval t_distill=$t_eval
if [ "$R1" = 1 ]; then
    $NS train grpo --recipe "$RECIPE" "${OVERRIDES[@]}"
    t_grpo=$(stamp)
    $NS eval --model "$RUN/grpo/model" --task arithmetic --levels "$LEVELS" --problems "$EVAL_PROBLEMS" \
        --max-tokens 256 --out "$RUN/eval_grpo.json"
    t_eval_grpo=$(stamp)
    $NS distill --recipe "$RECIPE" "${OVERRIDES[@]}"
    t_distill=$(stamp)
fi
cat > "$RUN/timing.json" <<JSON
{"setup": $((t_setup - start)), "tokenizer": $((t_tok - t_setup)), "pretrain": $((t_pre - t_tok)),
 "sft": $((t_sft - t_pre)), "eval": $((t_eval - t_sft)), "through_sft_eval": $((t_eval - start)),
 "grpo": $((t_grpo - t_eval)), "eval_grpo": $((t_eval_grpo - t_grpo)), "distill": $((t_distill - t_eval_grpo)),
 "total_seconds": $((t_distill - start))}
JSON
$NS report --run "$RUN"
echo
FINAL=$RUN/sft/model
[ "$R1" = 1 ] && FINAL=$RUN/grpo/model
echo "Done in $(( (t_distill - start) / 60 )) min $(( (t_distill - start) % 60 )) s (through SFT and its evaluation: $(( (t_eval - start) / 60 )) min $(( (t_eval - start) % 60 )) s). Report: $RUN/report.md"
echo "Chat with the model:   .venv/bin/nanoseek chat --model $FINAL"
echo "Or serve it:           .venv/bin/nanoseek serve --model $FINAL   (then open http://127.0.0.1:8000)"
