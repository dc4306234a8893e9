# The reduced demo ablations in the README (Ablations → What the demo's tables show).
# Run in a project folder whose data/ holds a finished demo (features + slides.csv), e.g.
#   mkdir demo-ablate && cd demo-ablate && cp ../params.yaml . && ln -s ../data data
#   cp .../benchmarks/results/ablate_demo/dtfd-m.yaml . && bash .../run.sh
set -e
S="-S crossval.n_folds=3 -S crossval.splits_path=splits3.json -S train.dmsmil.epochs=5 -S train.damil.epochs=5 -S train.dtfd.epochs=5"
wsimil splits $S
start=$(date +%s); wsimil ablate --model dmsmil --grid tables $S; echo "WALL tables $(( $(date +%s) - start )) s"
start=$(date +%s); wsimil ablate --model dtfd --grid dtfd-m.yaml $S; echo "WALL dtfd $(( $(date +%s) - start )) s"
start=$(date +%s); wsimil ablate --model dtfd --grid distill $S; echo "WALL distill $(( $(date +%s) - start )) s"
