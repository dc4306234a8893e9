from wsimil.cli import main

main()
