"""`python -m post_train …`: the `post-train` command, in the same process as the console script."""

from post_train.launch import main

main()
