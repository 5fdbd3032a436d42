from fastclip.report import main

main()
