# cryptfs: at an interactive login, unlock the shared volumes listed in
# /etc/cryptfs/unlock-at-login with the user's own volume passphrase.
#
# Install as /etc/profile.d/cryptfs-unlock.sh; login shells (sh, bash, dash)
# read it.  The list holds one backing directory (or mountpoint of a shared
# mount) per line; blank lines and lines starting with '#' are ignored, e.g.
#     # customer data, mounted at /srv/customers
#     /srv/backing/customers
# For each volume where the user has a key slot (`cryptfs unlock --check` asks
# the agent; users cannot read a volume's config), the user is asked for
# their passphrase of that volume (Enter skips it; three tries) and
# `cryptfs unlock` hands it to the key agent.  This is never the login
# password.  Volumes that are not the user's are skipped without a word.  If
# no agent answers, one line says so and nothing is asked.  The passphrase is read in a subshell
# and piped to cryptfs: the login shell never holds it, no command line shows
# it, and the terminal does not echo it.
# CRYPTFS_UNLOCK_LIST names another list (for tests).

cryptfs_unlock_at_login() (
    list=${CRYPTFS_UNLOCK_LIST:-/etc/cryptfs/unlock-at-login}
    [ -r "$list" ] || return 0
    command -v cryptfs >/dev/null 2>&1 || return 0
    if ! cryptfs status >/dev/null 2>&1; then
        echo "cryptfs: the key agent is not running: volumes stay locked (cryptfs unlock later)" >&2
        return 0
    fi
    tty=$(stty -g 2>/dev/null) || return 0
    trap 'stty "$tty" 2>/dev/null' EXIT
    trap 'exit 130' INT TERM
    while IFS= read -r backing <&3; do
        # trim blanks; skip empty lines and comments
        backing=${backing#"${backing%%[![:space:]]*}"}
        backing=${backing%"${backing##*[![:space:]]}"}
        case $backing in '' | '#'*) continue ;; esac
        cryptfs unlock --check "$backing" >/dev/null 2>&1 || continue  # not yours: ask nothing
        tries=0
        while [ "$tries" -lt 3 ]; do
            tries=$((tries + 1))
            stty -echo  # before the prompt: what is typed ahead is not shown either
            printf 'cryptfs: passphrase for %s (Enter to skip): ' "$backing"
            pass=
            IFS= read -r pass || pass=
            stty "$tty"
            printf '\n'
            [ -n "$pass" ] || break
            out=$(printf '%s\n' "$pass" | cryptfs unlock "$backing" --passphrase-file - 2>&1)
            rc=$?
            pass=
            case $rc in
                0) printf '%s\n' "$out"; break ;;
                3) printf '%s\n' "$out" >&2 ;;  # wrong passphrase: ask again
                8) case $out in
                       *"has no key slot"*) ;;
                       *) printf '%s\n' "$out" >&2 ;;
                   esac
                   break ;;
                *) printf '%s\n' "$out" >&2; break ;;
            esac
        done
    done 3<"$list"
)

case $- in
    *i*) [ -t 0 ] && [ -t 1 ] && cryptfs_unlock_at_login ;;
esac
unset -f cryptfs_unlock_at_login
