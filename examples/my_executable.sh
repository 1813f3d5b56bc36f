#!/bin/bash
# This script is "my_executable.sh" in the JSON example (seeds/000): it writes the date to $MYFILE.
date > $MYFILE
