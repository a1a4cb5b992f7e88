"""pltkit.export"""
