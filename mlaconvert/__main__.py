from mlaconvert.cli import main

main()
