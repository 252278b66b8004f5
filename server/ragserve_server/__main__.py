from ragserve_server.main import main

main()
