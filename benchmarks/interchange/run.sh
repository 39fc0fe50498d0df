#!/usr/bin/env bash
# The interchange checks, each tool in its own environment: drrik writes the dictionaries
# (this environment), SAELens and circuit-tracer load them (theirs). Results go to
# benchmarks/results/interchange-{saelens,circuit-tracer}${TAG:+-$TAG}.json (TAG=trained keeps
# a check of real transcoders apart from the default one). Extra arguments go to
# write_dictionaries.py (e.g. --transcoders RUN/final/*). The environments:
#   python3 -m venv /work/venv-saelens && /work/venv-saelens/bin/pip install torch==2.13.0 \
#     && /work/venv-saelens/bin/pip install sae-lens==6.54.12 'transformer-lens<4'
#   python3 -m venv /work/venv-ct && /work/venv-ct/bin/pip install torch==2.13.0 \
#     && /work/venv-ct/bin/pip install circuit-tracer==0.5.0 'nnsight<0.8'
# (circuit-tracer 0.5.0 asks for nnsight>=0.6 but imports nnsight.intervention.tracing,
# which 0.8 removed; 0.7.0 works.)
#   SAELENS_PYTHON=/work/venv-saelens/bin/python CT_PYTHON=/work/venv-ct/bin/python \
#     bash benchmarks/interchange/run.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
results=$here/../results
out=${OUT:-/tmp/drrik-interchange}
python "$here/write_dictionaries.py" "$out" "$@"
"${SAELENS_PYTHON:-/work/venv-saelens/bin/python}" "$here/saelens_check.py" "$out" \
  > "$results/interchange-saelens${TAG:+-$TAG}.json"
"${CT_PYTHON:-/work/venv-ct/bin/python}" "$here/circuit_tracer_check.py" "$out" \
  > "$results/interchange-circuit-tracer${TAG:+-$TAG}.json"
cat "$results"/interchange-{saelens,circuit-tracer}${TAG:+-$TAG}.json
