"""pltkit.serve"""
