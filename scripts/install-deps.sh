#!/bin/sh
# Installs what Tollgate needs to build and test, from Debian packages only.
# Idempotent: packages already present are skipped, so a second run costs
# one dpkg query.
set -eu

packages="
  build-essential cmake ninja-build ccache pkg-config git
  libboost1.81-dev libboost-json1.81-dev libboost-url1.81-dev
  libssl-dev openssl libsqlite3-dev sqlite3 libyaml-cpp-dev catch2
  postgresql libpq-dev
  prometheus nginx-light wrk curl python3 ca-certificates
  docker-compose python3-yaml
"

missing=""
for p in $packages; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed'; then
    missing="$missing $p"
  fi
done

if [ -n "$missing" ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "install-deps: installing:$missing"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  # The prometheus, nginx and postgresql packages try to start their services;
  # tests run their own instances on loopback ports, so policy-rc.d keeps them down.
  created_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    $sudo sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d'
    created_policy=1
  fi
  $sudo apt-get install -y -qq --no-install-recommends $missing
  [ -z "$created_policy" ] || $sudo rm -f /usr/sbin/policy-rc.d
fi

# The official OpenAI SDK for the client tests (tests/sdk), pinned by its
# package-lock.json. Node and npm usually come with the machine; where they
# do not, Debian's packages serve.
if ! command -v npm >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "install-deps: installing nodejs and npm"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends nodejs npm
fi
sdk_dir="$(dirname "$0")/../tests/sdk"
if [ ! -d "$sdk_dir/node_modules/openai" ]; then
  echo "install-deps: installing the OpenAI SDK into tests/sdk"
  (cd "$sdk_dir" && npm ci --no-audit --no-fund)
fi
