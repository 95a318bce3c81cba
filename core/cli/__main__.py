from kvyard.cli import main

main()
