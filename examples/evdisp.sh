#!/bin/bash
# An event display stand-in for the data examples: says which input file it was given
# ($P3S_INPUT_FILE, set by p3s_data.py -g and the injector) and how large it is.
echo "event display of $P3S_INPUT_FILE"
if [ -e "$P3S_INPUT_FILE" ]; then
    wc -c < "$P3S_INPUT_FILE"
fi
