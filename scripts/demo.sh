#!/usr/bin/env bash
# A quick tour of cryptfs on a throw-away volume (called by `scripts/run demo`).
set -uo pipefail
cd "$(dirname "$0")/.."
PATH="$PWD/.venv/bin:$PATH"

work=$(mktemp -d /tmp/cryptfs-demo.XXXXXX)
mnt="$work/mnt"
agent_pid=""
cleanup() {
    mountpoint -q "$mnt" 2>/dev/null && cryptfs unmount "$mnt"
    mountpoint -q "$work/shared-mnt" 2>/dev/null && cryptfs unmount "$work/shared-mnt"
    [[ -n "$agent_pid" ]] && kill "$agent_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

printf 'demo passphrase, not for real use\n' > "$work/passphrase"
mkdir "$mnt"

step "1. Create a volume (AES-256-GCM; Argon2id key slot)"
run cryptfs init "$work/backing" --passphrase-file "$work/passphrase" --recovery-key "$work/backing.key" || exit 1
run cryptfs info "$work/backing"

step "2. Mount it and work normally"
run cryptfs mount "$work/backing" "$mnt" --passphrase-file "$work/passphrase" \
    --log-file "$work/cryptfs.log" || exit 1
cat > "$mnt/customers.csv" <<'CSV'
surname,given,gender,phone,card
Zhang,Wei,M,13800138000,6222021234567890123
Müller,Anna,F,+49 30 1234567,4111111111111111
CSV
mkdir -p "$mnt/calls/2026-11-29"
echo "Customer asked to move the appointment to Friday." > "$mnt/calls/2026-11-29/note-0001.txt"
ln -s ../customers.csv "$mnt/calls/customers-link"
run ls -lR "$mnt"
run cat "$mnt/customers.csv"

step "3. The backing directory holds only ciphertext"
run find "$work/backing" -path '*/tree/*' -not -name .diriv
printf '$ grep -r Zhang %s   (no match expected)\n' "$work/backing"
grep -r Zhang "$work/backing" && echo "PLAINTEXT FOUND?!" || echo "(no match)"
first=$(find "$work/backing/tree" -maxdepth 1 -type f -not -name '.*' | head -n 1)
run od -A d -t x1 -N 64 "$first"

step "4. Unmount; fsck checks every name, header and block"
run cryptfs unmount "$mnt"
run cryptfs fsck "$work/backing" --passphrase-file "$work/passphrase"

step "5. Flip one bit of one file in the backing store"
victim=$(grep -l . $(find "$work/backing/tree" -maxdepth 1 -type f -not -name '.*') | head -n 1)
size=$(stat -c %s "$victim")
python3 - "$victim" <<'PY'
import sys
p = sys.argv[1]
b = bytearray(open(p, "rb").read())
b[-20] ^= 0x01
open(p, "wb").write(bytes(b))
PY
echo "flipped one bit at offset $((size - 20)) of $(basename "$victim")"
run cryptfs mount "$work/backing" "$mnt" --passphrase-file "$work/passphrase" \
    --log-file "$work/cryptfs.log" || exit 1
for f in "$mnt"/customers.csv "$mnt"/calls/2026-11-29/note-0001.txt; do
    printf '$ cat %s\n' "$f"; cat "$f" || echo "(read refused: the damaged block is never served)"
done
run tail -n 1 "$work/cryptfs.log"
run cryptfs unmount "$mnt"
printf '$ cryptfs fsck ...\n'
cryptfs fsck "$work/backing" --passphrase-file "$work/passphrase"
echo "(fsck exit code: $?; 6 means damage found)"

step "6. A wrong passphrase opens nothing"
printf 'guess\n' > "$work/wrong"
cryptfs mount "$work/backing" "$mnt" --passphrase-file "$work/wrong"
echo "(exit code: $?)"

step "7. One shared mount for many users: the key agent"
echo "A second volume, owned by root's key slot; a key agent on a private socket."
export CRYPTFS_AGENT_SOCKET="$work/agent.sock"
run cryptfs init "$work/shared" --passphrase-file "$work/passphrase" --no-recovery-key || exit 1
cryptfs-agent --log-file "$work/agent.log" --idle-timeout 600 &
agent_pid=$!
for _ in $(seq 100); do [[ -S "$CRYPTFS_AGENT_SOCKET" ]] && break; sleep 0.05; done
mkdir "$work/shared-mnt"
run cryptfs mount "$work/shared" "$work/shared-mnt" --agent --log-file "$work/shared.log" || exit 1
echo "Nobody has unlocked yet, root included: the mount serves no one."
run ls "$work/shared-mnt" || echo "(refused)"
run cryptfs unlock "$work/shared-mnt" --passphrase-file "$work/passphrase" || exit 1
run cryptfs status
echo "root's session is open: root may work; other users would still be refused."
echo "quarterly targets" > "$work/shared-mnt/plan.txt"
run cat "$work/shared-mnt/plan.txt"
run cryptfs lock
run cat "$work/shared-mnt/plan.txt" || echo "(refused again, at once)"
run cryptfs user list "$work/shared"
run cryptfs unmount "$work/shared-mnt"
kill "$agent_pid"; wait "$agent_pid" 2>/dev/null
run tail -n 3 "$work/agent.log"

step "8. Hybrid files: a drop box only the recovery key can read; a key rotation"
run cryptfs init "$work/calls" --passphrase-file "$work/passphrase" --recovery-key "$work/RECOVERY.key" || exit 1
run cryptfs policy set "$work/calls" /recordings --mode hybrid --dropbox --passphrase-file "$work/passphrase" || exit 1
run cryptfs mount "$work/calls" "$mnt" --passphrase-file "$work/passphrase" --log-file "$work/calls.log" || exit 1
mkdir "$mnt/recordings"
echo "call 0001: the customer confirmed the new address" > "$mnt/recordings/call-0001.txt"
echo "The writer closed the file; it is wrapped to the recovery key only:"
run cryptfs share "$mnt/recordings/call-0001.txt" --list
run cat "$mnt/recordings/call-0001.txt" || echo "(refused: the writer holds no key that opens it)"
echo "Rotate while mounted: a new master key, every header re-wrapped; users keep working."
run cryptfs rotate "$work/calls" --wrap-key --passphrase-file "$work/passphrase" || exit 1
run cryptfs unmount "$mnt"
echo "Offline, with the recovery key: new file keys, every block rewritten (the drop box too)."
run cryptfs rotate "$work/calls" --reencrypt --recovery-key "$work/RECOVERY.key" \
    --passphrase-file "$work/passphrase" || exit 1
echo "With the recovery key alone (no passphrase, no mount):"
run cryptfs recover "$work/calls" --recovery-key "$work/RECOVERY.key" --out "$work/recovered" || exit 1
run cat "$work/recovered/recordings/call-0001.txt"

step "Done: the throw-away volume in $work is removed now."
