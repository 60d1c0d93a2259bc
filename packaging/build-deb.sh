#!/usr/bin/env bash
# Builds the Debian packages of mooring and mooring-agent into target/debian/ (docs/install.md):
#   mooring_<version>-1_<arch>.deb, mooring-agent_<version>-1_<arch>.deb
# and their debug symbols as separate -dbgsym .ddeb packages beside them.
#
# Steps: install cargo-deb (pinned) if missing; build both binaries in one `cargo build -p ...`
# (never --workspace: that would unify the simulator's tokio test-util into the server,
# ARCHITECTURE.md, mooring-sim); generate the man pages and shell completions from the binaries'
# own clap definitions into packaging/generated/; `cargo deb --no-build` for each package (metadata:
# `[package.metadata.deb]` in crates/mooring/Cargo.toml and crates/mooring-agent/Cargo.toml; units,
# configs and maintainer scripts: packaging/mooring/, packaging/mooring-agent/).
#
# Environment: MOORING_DEB_PROFILE (default release) picks another cargo profile;
# MOORING_DEB_FAST=1 (the smoke test) strips the debug symbols instead of packaging them and
# compresses lightly: seconds instead of about a minute, the same binaries.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0
profile="${MOORING_DEB_PROFILE:-release}"

if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
    cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION"
fi

cargo build --locked --profile "$profile" -p mooring -p mooring-agent

target_dir=$(cargo metadata --format-version 1 --no-deps --locked |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
bin="$target_dir/$profile"

# The asset paths in the Cargo.toml files point here (relative to the repository; git ignores it).
gen=packaging/generated
rm -rf "$gen"
mkdir -p "$gen/mooring/completions" "$gen/mooring-agent/completions"
"$bin/mooring" man --out "$gen/mooring/man"
"$bin/mooring-agent" --man "$gen/mooring-agent/man"
"$bin/mooring" completions bash >"$gen/mooring/completions/mooring.bash"
"$bin/mooring" completions zsh >"$gen/mooring/completions/_mooring"
"$bin/mooring" completions fish >"$gen/mooring/completions/mooring.fish"
"$bin/mooring-agent" --completions bash >"$gen/mooring-agent/completions/mooring-agent.bash"
"$bin/mooring-agent" --completions zsh >"$gen/mooring-agent/completions/_mooring-agent"
"$bin/mooring-agent" --completions fish >"$gen/mooring-agent/completions/mooring-agent.fish"

if [ "${MOORING_DEB_FAST:-0}" = 1 ]; then
    debug=(--strip --fast)
else
    debug=(--dbgsym)
fi
rm -rf target/debian
mkdir -p target/debian
for package in mooring mooring-agent; do
    cargo deb --no-build --locked --profile "$profile" -p "$package" "${debug[@]}" \
        --output target/debian/
done
ls -l target/debian/
