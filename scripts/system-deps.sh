#!/usr/bin/env bash
# Debian packages the tests need beyond the Python ones: a compiler and CMake for llama.cpp, Chromium for the report's
# browser test. (No compiler cache: builds of one source with other CPU flags share one build tree, which make
# recompiles incrementally.)
# Installs only what is missing, so a warm machine spends no time here.
set -euo pipefail
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++)
command -v git >/dev/null || need+=(git)
command -v chromium >/dev/null || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi
  echo "installing system packages: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
