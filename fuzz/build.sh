#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/fuzz_*.cpp) against the core sources they exercise, with
# clang's libFuzzer, ASan and UBSan; any UB report aborts (-fno-sanitize-recover).
#   fuzz/build.sh [OUT]      default OUT: build/fuzz; binaries land in OUT/bin
# Needs clang++ (14 or later) with libclang-rt-dev (Debian: clang libclang-rt-14-dev), and
# libjpeg-turbo's headers for fuzz_jpeg_decode (Debian: libjpeg62-turbo-dev).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/build/fuzz}"
cxx="${CXX_FUZZ:-$(command -v clang++ || command -v clang++-14)}"
flags=(-std=c++17 -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
       -I"$root/csrc/core" -I"$root/fuzz")
mkdir -p "$out/obj" "$out/bin"
pids=()
wait_all() {  # fails (set -e) when any background compile failed
  for p in "${pids[@]}"; do wait "$p"; done
  pids=()
}

# target -> the core sources it links: only the parsers under test and what they call.
declare -A sources=(
  [fuzz_shard_reader]="checkpoint/shard_reader.cpp common/crc32c.cpp common/file_io.cpp"
  [fuzz_shard_file]="data/shard_file.cpp data/block_checksums.cpp common/mapped_read_guard.cpp common/crc32c.cpp"
  [fuzz_mmap_dataset]="data/mmap_dataset.cpp data/shard_file.cpp data/block_checksums.cpp common/mapped_read_guard.cpp common/crc32c.cpp"
  [fuzz_jpeg_decode]="image/jpeg_decode.cpp image/crop_resize.cpp image/resize_portable.cpp image/resize_avx2.cpp"
)
# What a core file needs defined, and a target linked, beyond the shared flags.
declare -A defines=([image/jpeg_decode.cpp]=-DPYENGINE_HAVE_LIBJPEG)
declare -A libs=([fuzz_jpeg_decode]=-ljpeg)

# Each core file is compiled once and shared. The parsers get coverage instrumentation; the
# code they call does not: coverage of CRC32C's inner loops guides the fuzzer nowhere and
# made crc32c_combine most of each execution's time.
uninstrumented=" common/crc32c.cpp common/file_io.cpp common/mapped_read_guard.cpp image/crop_resize.cpp
  image/resize_portable.cpp image/resize_avx2.cpp "
obj() { echo "$out/obj/$(echo "$1" | tr / _).o"; }
for s in $(printf '%s\n' ${sources[@]} | sort -u); do
  coverage=-fsanitize=fuzzer-no-link
  [[ "$uninstrumented" == *" $s "* ]] && coverage=
  "$cxx" "${flags[@]}" $coverage ${defines[$s]:-} -c "$root/csrc/core/$s" -o "$(obj "$s")" &
  pids+=($!)
done
wait_all
for target in "${!sources[@]}"; do
  objs=()
  for s in ${sources[$target]}; do objs+=("$(obj "$s")"); done
  "$cxx" "${flags[@]}" -fsanitize=fuzzer "$root/fuzz/$target.cpp" "${objs[@]}" ${libs[$target]:-} -lpthread \
    -o "$out/bin/$target" &
  pids+=($!)
done
wait_all
echo "built: $(ls "$out/bin" | tr '\n' ' ')"
