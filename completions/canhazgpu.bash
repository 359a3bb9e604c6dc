# bash completion for canhazgpu and its short name chg               -*- shell-script -*-
# Needs bash-completion (Debian: apt-get install bash-completion).  Installed as
# share/bash-completion/completions/canhazgpu (and chg), it is loaded on first use.

# Reads `status --json` (any layout) and prints "id<TAB>details" for the GPUs that `want`
# asks for: "free" ones, or "mine" (held by the account `me`).  The zsh and fish completions
# hold the same program.
_canhazgpu_status_awk='
{ text = text $0 "\n" }
function flush() {
    if (id != "" && ((want == "free" && st == "AVAILABLE") || (want == "mine" && owner == me)))
        print id "\t" details
    id = st = owner = details = ""
}
END {
    pat = "\"(gpu_id|status|actual_user|details)\": *(\"[^\"]*\"|[0-9]+)"
    while (match(text, pat)) {
        tok = substr(text, RSTART, RLENGTH)
        text = substr(text, RSTART + RLENGTH)
        key = tok; sub(/^"/, "", key); sub(/".*/, "", key)
        val = tok; sub(/^"[a-z_]*": */, "", val); gsub(/^"|"$/, "", val)
        if (key == "gpu_id") { flush(); id = val }
        else if (key == "status") st = val
        else if (key == "actual_user") owner = val
        else details = val
    }
    flush()
}'

# GPU ids for -G/--gpu-ids, asked of Redis through `status --json` only if it answers within
# CANHAZGPU_COMPLETION_TIMEOUT (0.3 s): completion must never hang on a slow or dead Redis.
# $1: free or mine; the global options already typed (--redis-url ...) are passed on.
_canhazgpu_gpu_ids()
{
    type timeout &>/dev/null || return
    local -a globals=()
    local i
    for ((i = 1; i < cword; i++)); do
        case ${words[i]} in
            --config | --redis-url | --redis-host | --redis-port | --redis-db | --memory-threshold)
                globals+=("${words[i]}" "${words[i + 1]}")
                ((i++))
                ;;
            --config=* | --redis-url=* | --redis-host=* | --redis-port=* | --redis-db=* | \
                --memory-threshold=*)
                globals+=("${words[i]}")
                ;;
        esac
    done
    local prefix="" done_ids=""
    if [[ $cur == *,* ]]; then
        prefix=${cur%,*},
        done_ids=,$prefix
    fi
    local line ids=()
    while IFS=$'\t' read -r line _; do
        [[ $done_ids == *",$line,"* ]] || ids+=("$prefix$line")
    done < <(timeout "${CANHAZGPU_COMPLETION_TIMEOUT:-0.3}" "${words[0]}" status --json \
        "${globals[@]}" </dev/null 2>/dev/null |
        awk -v want="$1" -v me="$(id -un)" "$_canhazgpu_status_awk")
    COMPREPLY=($(compgen -W "${ids[*]}" -- "$cur"))
}

_canhazgpu()
{
    local cur prev words cword split
    # -s: `--opt=value` is split; -n : keeps `redis://host:port` one word.
    _init_completion -s -n : || return

    local commands="admin status run reserve release report queue web"
    # Options that take a value, and every option, for each command (_: before the command).
    local global_args="--config --redis-url --redis-host --redis-port --redis-db --memory-threshold"
    local request="-g --gpus -G --gpu-ids --nonblock -w --wait -n --note -u --user"
    local -A args=(
        [_]=""
        [admin]="-g --gpus -p --provider"
        [run]="-g --gpus -G --gpu-ids -w --wait -n --note -u --user -t --timeout --signal
               --kill-after"
        [reserve]="-g --gpus -G --gpu-ids -w --wait -n --note -u --user -d --duration"
        [release]="-G --gpu-ids"
        [report]="-d --days"
        [web]="--host -p --port"
    )
    local -A opts=(
        [_]="--version"
        [admin]="-g --gpus --force -y --yes -p --provider"
        [status]="-j --json --no-color"
        [run]="$request -t --timeout --signal --kill-after"
        [reserve]="$request -d --duration -f --force -s --short"
        [release]="-G --gpu-ids"
        [report]="-d --days -j --json"
        [queue]="-j --json"
        [web]="--host -p --port --demo"
    )

    # The command is the first word that is neither an option nor an option's value.
    local i cmd=_
    for ((i = 1; i < cword; i++)); do
        if [[ $cmd == _ && ${words[i]} != -* && " $global_args " != *" ${words[i - 1]} "* ]]; then
            [[ " $commands " == *" ${words[i]} "* ]] && cmd=${words[i]}
        fi
    done

    # run ... -- CMD: complete CMD and its arguments as if typed alone (like sudo, nohup).
    if [[ $cmd == run ]]; then
        for ((i = 1; i < COMP_CWORD; i++)); do
            if [[ ${COMP_WORDS[i]} == -- ]]; then
                _command_offset $((i + 1))
                return
            fi
        done
    fi

    case $prev in
        --config)
            _filedir
            return
            ;;
        --redis-url)
            compopt -o nospace
            COMPREPLY=($(compgen -W "redis:// rediss:// unix://" -- "$cur"))
            __ltrim_colon_completions "$cur"
            return
            ;;
        --redis-host | --host)
            _known_hosts_real -- "$cur"
            return
            ;;
        -G | --gpu-ids)
            if [[ $cmd == release ]]; then
                _canhazgpu_gpu_ids mine
            elif [[ $cmd == run || $cmd == reserve ]]; then
                _canhazgpu_gpu_ids free
            fi
            return
            ;;
        --provider | -p)
            [[ $cmd == admin ]] && COMPREPLY=($(compgen -W "nvidia amd fake" -- "$cur"))
            [[ $cmd == admin || $cmd == web ]] && return
            ;;
        --signal)
            COMPREPLY=($(compgen -W "INT TERM HUP QUIT KILL USR1 USR2" -- "${cur^^}"))
            return
            ;;
    esac
    # Any other value (a count, a duration, a note) is the user's to type.
    if $split || [[ " $global_args ${args[$cmd]-} " == *" $prev "* ]]; then
        return
    fi

    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "${opts[$cmd]} -h --help $global_args" -- "$cur"))
    elif [[ $cmd == _ ]]; then
        COMPREPLY=($(compgen -W "$commands" -- "$cur"))
    elif [[ $cmd == run ]]; then
        COMPREPLY=($(compgen -W "--" -- "$cur"))
    fi
} &&
    complete -F _canhazgpu canhazgpu chg

# ex: filetype=sh
