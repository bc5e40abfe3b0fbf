#!/usr/bin/env bash
# Download GSM8k-Aug (the Internalize-CoT release, pinned commit) into data/ and
# convert it to data/gsm_{train,valid,test}.json with preprocessing/gsm_icot.py.
#
#   bash preprocessing/gsm_icot.bash            # from anywhere; writes <repo>/data/
#   DATA_DIR=/elsewhere bash preprocessing/gsm_icot.bash
#   KEEP_TXT=1 bash preprocessing/gsm_icot.bash # keep the downloaded .txt files
#
# Files already downloaded (data/gsm_SPLIT.txt) are not fetched again.
# Expected sizes: train 385,620 lines, valid 500, test 1,319.
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 0
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA_DIR="${DATA_DIR:-$REPO/data}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
COMMIT=e06a32ee5e4cd117171daeb4755d2a97ece62761
PATH_IN_REPO="da03/Internalize_CoT_Step_by_Step/$COMMIT/data/gsm8k"
# train.txt is stored with Git LFS (media host); the small files are plain (raw host).
HOSTS=("https://media.githubusercontent.com/media" "https://raw.githubusercontent.com")
declare -A EXPECTED=([train]=385620 [valid]=500 [test]=1319)

fetch() {  # fetch URL OUT
  if command -v curl >/dev/null 2>&1; then
    curl -fsSL --retry 3 -o "$2" "$1"
  else
    wget -q -O "$2" "$1"
  fi
}

download() {  # download SPLIT -> $DATA_DIR/gsm_SPLIT.txt
  local split="$1" out="$DATA_DIR/gsm_$1.txt" host
  if [[ -s "$out" ]] && ! head -c 40 "$out" | grep -q "git-lfs"; then
    echo "$out already there"
    return 0
  fi
  for host in "${HOSTS[@]}"; do
    if fetch "$host/$PATH_IN_REPO/$split.txt" "$out.part" && ! head -c 40 "$out.part" | grep -q "git-lfs"; then
      mv "$out.part" "$out"
      echo "downloaded $out from $host"
      return 0
    fi
  done
  rm -f "$out.part"
  echo "error: could not download $split.txt (tried ${HOSTS[*]})" >&2
  return 1
}

mkdir -p "$DATA_DIR"
for split in train valid test; do
  download "$split"
  lines=$(grep -c . "$DATA_DIR/gsm_$split.txt" || true)
  if [[ "$lines" != "${EXPECTED[$split]}" ]]; then
    echo "warning: gsm_$split.txt has $lines lines, expected ${EXPECTED[$split]}" >&2
  fi
done
"$PYTHON" "$REPO/preprocessing/gsm_icot.py" --data_dir "$DATA_DIR" train valid test
if [[ -z "${KEEP_TXT:-}" ]]; then
  rm -f "$DATA_DIR"/gsm_{train,valid,test}.txt
fi
