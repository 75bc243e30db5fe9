from int8eval.cli import main

main()
