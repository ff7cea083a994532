#!/usr/bin/env bash
# System packages the integration tests need: Chromium (+ its WebDriver) for the MLflow UI test,
# PostgreSQL for the scale-out test, nginx for the serving proxy's test, Chromaprint's fpcalc for
# the duplicate fingerprints, lame for the promote stage's MP3 re-encoding of test clips.
# Idempotent: installs only what is missing, and refreshes the apt index only when something must
# be installed. Runs as root (CI) or through sudo.
set -euo pipefail

# fonts-dejavu-core: headless Chromium renders text (and readable screenshots) only with a font.
# Arguments name a subset (`make setup` asks only for libchromaprint-tools and lame, which the
# pipeline's duplicates and promote stages run); none: everything the tests need.
packages=(chromium chromium-driver postgresql fonts-dejavu-core libchromaprint-tools lame
    nginx-light)
if [[ $# -gt 0 ]]; then
    packages=("$@")
fi

missing=()
for package in "${packages[@]}"; do
    status=$(dpkg-query --show --showformat='${db:Status-Status}' "$package" 2>/dev/null || true)
    if [[ "$status" != "installed" ]]; then
        missing+=("$package")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "system packages: all present (${packages[*]})"
    exit 0
fi

sudo=()
if [[ $(id -u) -ne 0 ]]; then
    sudo=(sudo)
fi

echo "system packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# An index is needed on a fresh machine (empty /var/lib/apt/lists); a failed install with a stale
# index is retried once after a refresh.
if ! compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null; then
    "${sudo[@]}" apt-get update -qq
fi
install=("${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}")
if ! "${install[@]}"; then
    "${sudo[@]}" apt-get update -qq
    "${install[@]}"
fi
