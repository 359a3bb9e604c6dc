# fish completion for canhazgpu and its short name chg.  Installed as
# share/fish/vendor_completions.d/canhazgpu.fish (and chg.fish), it is loaded on first use.

# The command on the line: the first word that is neither an option nor a global option's
# value.  Fails while there is none yet.
function __canhazgpu_command
    set -l tokens (commandline -opc)
    set -e tokens[1]
    set -l skip 0
    for token in $tokens
        if test $skip = 1
            set skip 0
            continue
        end
        switch $token
            case --config --redis-url --redis-host --redis-port --redis-db --memory-threshold
                set skip 1
            case admin status run reserve release report queue web
                echo $token
                return 0
        end
    end
    return 1
end

function __canhazgpu_using
    contains -- (__canhazgpu_command) $argv
end

# The words after `run ... --` (the command run wraps); fails before the `--`.
function __canhazgpu_wrapped
    set -l tokens (commandline -opc)
    set -l dashdash (contains -i -- -- $tokens)
    and test (__canhazgpu_command) = run
    or return 1
    set -e tokens[1..$dashdash]
    printf '%s\n' $tokens
end

# The global options typed anywhere on the line (--redis-url ...): they say which Redis to ask.
function __canhazgpu_globals
    set -l tokens (commandline -opc)
    set -l skip 0
    for token in $tokens
        if test $skip = 1
            echo $token
            set skip 0
            continue
        end
        switch $token
            case --config --redis-url --redis-host --redis-port --redis-db --memory-threshold
                echo $token
                set skip 1
            case '--config=*' '--redis-url=*' '--redis-host=*' '--redis-port=*' '--redis-db=*' \
                '--memory-threshold=*'
                echo $token
        end
    end
end

# GPU ids for -G/--gpu-ids with what status says of each, asked of Redis through
# `status --json` only if it answers within CANHAZGPU_COMPLETION_TIMEOUT (0.3 s), so that
# completion never hangs on a slow or dead Redis.  $argv[1]: free or mine.
function __canhazgpu_gpu_ids
    command -q timeout; or return
    set -l limit 0.3
    set -q CANHAZGPU_COMPLETION_TIMEOUT; and set limit $CANHAZGPU_COMPLETION_TIMEOUT
    # After `1,3,` complete the next id of the list.
    set -l typed (commandline -ct | string replace -r -- '^(--gpu-ids=|-G)' '')
    set -l prefix (string match -r -- '^.*,' $typed)
    set -l listed (string split -- , $prefix)
    set -l program (commandline -opc)[1]
    timeout $limit $program status --json (__canhazgpu_globals) </dev/null 2>/dev/null |
        awk -v want=$argv[1] -v me=(id -un) '
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
            }' |
        while read -l -d \t id details
            contains -- $id $listed; or printf '%s%s\t%s\n' "$prefix" $id $details
        end
end

for prog in canhazgpu chg
    # Nothing completes file names but --config and the command that `run` wraps.
    complete -c $prog -f

    set -l before_command 'not __canhazgpu_command'
    set -l own 'not __canhazgpu_wrapped'
    complete -c $prog -n $before_command -a admin -d 'initialise the GPU pool of this machine'
    complete -c $prog -n $before_command -a status -d 'show who holds which GPU, and who uses one unreserved'
    complete -c $prog -n $before_command -a run -d 'reserve GPUs, run a command on them, release them when it ends'
    complete -c $prog -n $before_command -a reserve -d 'reserve GPUs for interactive work'
    complete -c $prog -n $before_command -a release -d 'release your reservations'
    complete -c $prog -n $before_command -a report -d 'GPU hours per user'
    complete -c $prog -n $before_command -a queue -d 'show who is waiting for GPUs, in order'
    complete -c $prog -n $before_command -a web -d 'serve the dashboard, a JSON API and Prometheus metrics'

    # Global options, before or after the command.
    complete -c $prog -n $before_command -l version -d 'print the version and exit'
    complete -c $prog -n $own -s h -l help -d 'show help and exit'
    complete -c $prog -n $own -l config -r -F -d 'config file to read'
    complete -c $prog -n $own -l redis-url -x -a 'redis:// rediss:// unix://' -d 'Redis URL'
    complete -c $prog -n $own -l redis-host -x -a '(__fish_print_hostnames)' -d 'Redis host (localhost)'
    complete -c $prog -n $own -l redis-port -x -d 'Redis port (6379)'
    complete -c $prog -n $own -l redis-db -x -d 'Redis database number (0)'
    complete -c $prog -n $own -l memory-threshold -x -d 'a GPU using more memory than this MB is in use (1024)'

    set -l admin '__canhazgpu_using admin'
    complete -c $prog -n $admin -s g -l gpus -x -d 'number of GPUs in the pool'
    complete -c $prog -n $admin -l force -d 're-initialise an existing pool, ending every reservation'
    complete -c $prog -n $admin -s y -l yes -d 'with --force: do not ask on a terminal'
    complete -c $prog -n $admin -s p -l provider -x -d 'how GPU usage is validated (default: detected)' \
        -a 'nvidia\t"NVIDIA GPUs, checked with nvidia-smi"
            amd\t"AMD GPUs, checked with amd-smi"
            fake\t"no GPU tool: every GPU idle (demos, machines without GPUs)"'

    set -l status_ '__canhazgpu_using status'
    complete -c $prog -n $status_ -s j -l json -d 'print JSON'
    complete -c $prog -n $status_ -l no-color -d 'no colours (also: NO_COLOR=1)'

    # run and reserve ask for GPUs alike.
    set -l request '__canhazgpu_using run reserve; and not __canhazgpu_wrapped'
    complete -c $prog -n $request -s g -l gpus -x -d 'number of GPUs (default 1)'
    complete -c $prog -n $request -s G -l gpu-ids -x -a '(__canhazgpu_gpu_ids free)' -d 'specific GPUs, e.g. 1,3'
    complete -c $prog -n $request -l nonblock -d 'fail at once instead of waiting in the queue'
    complete -c $prog -n $request -s w -l wait -x -d 'wait in the queue at most this long (e.g. 30m)'
    complete -c $prog -n $request -s n -l note -x -d 'a note shown in status'
    complete -c $prog -n $request -s u -l user -x -d 'display name for a shared account (ownership stays yours)'

    set -l run '__canhazgpu_using run; and not __canhazgpu_wrapped'
    complete -c $prog -n $run -s t -l timeout -x -d 'stop the command after this long (e.g. 2h); exit 124'
    complete -c $prog -n $run -l signal -x -a 'INT TERM HUP QUIT KILL USR1 USR2' -d 'signal sent at the timeout (default INT)'
    complete -c $prog -n $run -l kill-after -x -d 'SIGKILL this long after the timeout signal (default 30s)'
    complete -c $prog -n $run --arguments=-- -d 'the command to run follows'
    # After `--`: the command to run and its arguments, completed as if typed alone (like sudo).
    complete -c $prog -n __canhazgpu_wrapped -a '(__fish_complete_subcommand --commandline (__canhazgpu_wrapped) (commandline -ct))'

    set -l reserve '__canhazgpu_using reserve'
    complete -c $prog -n $reserve -s d -l duration -x -d 'how long (default 8h; 30m, 0.5h, 2d, 1h30m)'
    complete -c $prog -n $reserve -s f -l force -d 'also take GPUs in use without a reservation'
    complete -c $prog -n $reserve -s s -l short -d 'print only the ids, e.g. 1,3'

    complete -c $prog -n '__canhazgpu_using release' -s G -l gpu-ids -x -a '(__canhazgpu_gpu_ids mine)' -d 'release these GPUs (yours, run or manual)'

    set -l report '__canhazgpu_using report'
    complete -c $prog -n $report -s d -l days -x -d 'days to cover, 1-90 (default 30)'
    complete -c $prog -n $report -s j -l json -d 'print JSON'

    complete -c $prog -n '__canhazgpu_using queue' -s j -l json -d 'print JSON'

    set -l web '__canhazgpu_using web'
    complete -c $prog -n $web -l host -x -a '(__fish_print_hostnames)' -d 'address to listen on (default 0.0.0.0)'
    complete -c $prog -n $web -s p -l port -x -d 'port (default 8080)'
    complete -c $prog -n $web -l demo -d 'serve sample data without Redis'
end
