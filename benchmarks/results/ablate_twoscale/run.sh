# The two-scale test bench (README: Ablations -> The two-scale test bench): a synthetic
# cohort whose positives carry a 20x-only or a 10x-only lesion (synth.twoscale), the
# single-scale check (DAMIL at 10x and at 20x), then the DMSMIL tables and DTFD M grids,
# at a reduced size. Run it in an empty project folder holding a copy of params.yaml:
#   mkdir twoscale && cd twoscale && cp .../params.yaml . && bash .../ablate_twoscale/run.sh
set -e
here=$(cd "$(dirname "$0")" && pwd)
D="-S synth.twoscale=true -S synth.tumour_share=0.1 -S crossval.n_folds=3 -S crossval.experiment=wsimil-twoscale"
S="$D -S train.dmsmil.epochs=5 -S train.damil.epochs=5 -S train.dtfd.epochs=5"
t() { local start=$(date +%s); "$@"; echo "WALL $(( $(date +%s) - start )) s: $*"; }
t python -m wsimil synth $D
t python -m wsimil tiles $D
t python -m wsimil features $D
t python -m wsimil splits $D
t python -m wsimil ablate --model dmsmil --grid tables $S
t python -m wsimil ablate --model dtfd --grid "$here/dtfd-afs.yaml" $S
python "$here/lesions.py" results/ablate   # per-lesion AUC of every cell -> results/ablate/lesion_auc.csv
